"""Rank 0's side of a tensor-parallel model: it runs in the engine's process, beside the scheduler,
sends each step's message to ranks 1.., runs its own share of the forward and gets the logits.

Ranks 1.. are Ray actors in the replica's placement group (one bundle each; outside Serve the
executor makes the group), or threads of this process (`workers="threads"`: tests and benchmarks on
one machine, the same worker code and the same collectives). The forward's collectives keep the
ranks in step, so a message is sent and not waited for; a worker's failure surfaces at the next step.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from pathlib import Path

from serve_apps.engine.config import EngineConfig
from serve_apps.engine.model_runner import StepLogits
from serve_apps.engine.scheduler import SchedulerOutput
from serve_apps.engine.models.tp_layout import RankShard
from serve_apps.engine.step_message import StepMessageBuilder
from serve_apps.engine.tp_worker import (LOOPBACK, RankInfo, Rendezvous, TPWorker, build_rank, node_id, node_ip,
                                         weight_bytes)

class WorkerFailed(RuntimeError):
    """A tensor-parallel worker could not start or died: the model cannot step any more."""


class TPExecutor:
    def __init__(self, model_path: Path, config: EngineConfig, shards: list[RankShard], num_blocks: int,
                 workers: str = "ray"):
        self.workers, self._ray_workers, self.runner = [], None, None
        self.messages = StepMessageBuilder()
        self.timeout_s = config.tp_timeout_s
        self.message_s = 0.0  # rank 0's time building and sending messages (the benchmark's share)
        try:
            self._start(model_path, config, shards, num_blocks, workers)
        except BaseException:
            self.shutdown()  # no actor, placement group or shared memory left behind a failed start
            raise
        self.model = self.runner.model

    def _start(self, model_path: Path, config: EngineConfig, shards: list[RankShard], num_blocks: int,
               workers: str) -> None:
        if workers == "threads":
            one_node, spawn = True, ThreadWorker
        else:
            self._ray_workers = RayWorkers(config, len(shards))
            one_node, spawn = self._ray_workers.all_on_this_node(), self._ray_workers.spawn
        use_shm = config.tp_all_reduce == "shm" or (config.tp_all_reduce == "auto" and one_node)
        host = LOOPBACK if one_node else node_ip()
        rendezvous = Rendezvous(host, _free_port(host), f"rayfoundry-tp-{uuid.uuid4().hex[:12]}" if use_shm else None,
                                config.tp_timeout_s)
        for shard in shards[1:]:
            self.workers.append(spawn(str(model_path), config, shard, rendezvous, num_blocks))
        self.runner, self._load_peak = _build_rank_zero(model_path, config, shards[0], rendezvous, num_blocks,
                                                        self.workers)

    def execute(self, out: SchedulerOutput) -> StepLogits:
        started = time.perf_counter()
        message = self.messages.build(out)
        for worker in self.workers:
            worker.submit(message)
        self.message_s += time.perf_counter() - started  # the benchmark's share of step time in messages
        try:
            logits = self.runner.execute(out)
        except Exception as error:
            self._raise_worker_failure()
            raise WorkerFailed(f"tensor-parallel step failed: {error}") from error
        self._raise_worker_failure()
        return logits

    def rank_infos(self) -> list[RankInfo]:
        rank0 = RankInfo(0, node_id(), os.getpid(), weight_bytes(self.model), self._load_peak)
        return [rank0, *(worker.info() for worker in self.workers)]

    def check_health(self) -> None:
        """Raise if a worker died, even while no step runs (Serve calls this every few seconds, and
        gives up on an answer after 30 s: a ping waits at most one long step)."""
        self._raise_worker_failure()
        for worker in self.workers:
            worker.ping(min(self.timeout_s, 10.0))

    def _raise_worker_failure(self) -> None:
        for worker in self.workers:
            worker.raise_if_failed()

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.runner is not None:
            self.runner.model.group.close()
        if self._ray_workers is not None:
            self._ray_workers.remove_group()


def _build_rank_zero(model_path, config, shard, rendezvous, num_blocks, workers):
    """Rank 0 joins the group in a thread while this one watches the workers start: a worker that
    fails before it joins ends the wait at once (the group would wait its whole timeout)."""
    result: dict = {}

    def build():
        try:
            result["rank"] = build_rank(model_path, config, shard, rendezvous, num_blocks)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=build, daemon=True, name="tp-rank-0")
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        for worker in workers:
            worker.raise_if_failed(starting=True)
    if "error" in result:
        for worker in workers:  # a worker's failure, when there is one, is why rank 0's wait ended
            worker.raise_if_failed(starting=True)
        raise result["error"]
    for worker in workers:
        worker.wait_started(config.tp_timeout_s)
    return result["rank"]


class ThreadWorker:
    """A rank in a thread of this process: the worker code and collectives of a Ray actor, no process."""

    def __init__(self, *args):
        self._inbox: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=args, daemon=True, name="tp-worker")
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            self._worker = TPWorker(*args)
            self._started.set()
            while (message := self._inbox.get()) is not None:
                self._worker.execute(message)
        except BaseException as error:  # noqa: BLE001 - reported to rank 0
            self._error = error
            self._started.set()

    def submit(self, message) -> None:
        self._inbox.put(message)

    def raise_if_failed(self, starting: bool = False) -> None:
        if self._error is not None:
            raise WorkerFailed(f"tensor-parallel worker failed: {self._error!r}") from self._error

    def wait_started(self, timeout_s: float) -> None:
        if not self._started.wait(timeout_s):
            raise WorkerFailed(f"a tensor-parallel worker did not start within {timeout_s:.0f} s")
        self.raise_if_failed()

    def info(self) -> RankInfo:
        return self._worker.info()

    def ping(self, timeout_s: float) -> None:
        self.raise_if_failed()
        if not self._thread.is_alive():
            raise WorkerFailed("tensor-parallel worker thread ended")

    def stop(self) -> None:
        self._inbox.put(None)


class RayWorkers:
    """Ranks 1.. as Ray actors, one per bundle of the replica's placement group (made here outside Serve)."""

    def __init__(self, config: EngineConfig, tp: int):
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        self.config = config
        self.group = get_current_placement_group()
        self.first_bundle = 1  # a Serve replica sits in bundle 0
        self.owns_group = self.group is None
        if self.owns_group:
            strategy = config.placement_strategy
            gpus = {"GPU": config.num_gpus_per_worker} if config.num_gpus_per_worker else {}
            self.group = placement_group([{"CPU": config.num_cpus_per_worker, **gpus}] * (tp - 1),
                                         strategy=strategy)
            self.first_bundle = 0
            if not self.group.wait(config.tp_timeout_s):
                ray.util.remove_placement_group(self.group)
                raise WorkerFailed(f"no room for {tp - 1} tensor-parallel workers of {config.num_cpus_per_worker} "
                                   f"CPU ({strategy}) within {config.tp_timeout_s:.0f} s")
        self._next = self.first_bundle

    def all_on_this_node(self) -> bool:
        """Every bundle on this process's node: shared memory can carry the sums."""
        import ray
        from ray.util.placement_group import placement_group_table

        nodes = set(placement_group_table(self.group)["bundles_to_node_id"].values())
        return nodes == {ray.get_runtime_context().get_node_id()}

    def remove_group(self) -> None:
        if self.owns_group:
            import ray
            ray.util.remove_placement_group(self.group)

    def spawn(self, *args) -> RayWorker:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=self._next)
        self._next += 1
        cpus, gpus = self.config.num_cpus_per_worker, self.config.num_gpus_per_worker
        actor = ray.remote(TPWorker).options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=strategy,
                                             max_restarts=0)
        return RayWorker(actor.remote(*args, threads=max(1, int(cpus))))


class RayWorker:
    def __init__(self, actor):
        import ray

        self.actor = actor
        self._ready = actor.info.remote()  # runs once __init__ is done; fails if it failed
        self._pending: list = []
        self._lock = threading.Lock()  # the engine's step thread and Serve's health check both look
        self._ray = ray

    def submit(self, message) -> None:
        with self._lock:
            self._pending.append(self.actor.execute.remote(message))

    def raise_if_failed(self, starting: bool = False) -> None:
        with self._lock:
            refs = [self._ready] if starting else list(self._pending)
            done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
            if not starting:
                self._pending = [ref for ref in self._pending if ref not in done]
        try:
            self._ray.get(done)
        except Exception as error:
            raise WorkerFailed(f"tensor-parallel worker failed: {error}") from error

    def wait_started(self, timeout_s: float) -> None:
        try:
            self._ray.get(self._ready, timeout=timeout_s)
        except Exception as error:
            raise WorkerFailed(f"tensor-parallel worker did not start: {error}") from error

    def info(self) -> RankInfo:
        return self._ray.get(self.actor.info.remote())

    def ping(self, timeout_s: float) -> None:
        """The actor answers (after any step it is running): a dead one fails at once."""
        try:
            self._ray.get(self.actor.info.remote(), timeout=timeout_s)
        except Exception as error:
            raise WorkerFailed(f"tensor-parallel worker failed: {error}") from error

    def stop(self) -> None:
        self._ray.kill(self.actor)


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
