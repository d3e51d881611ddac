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
from serve_apps.engine.tp_worker import RankInfo, Rendezvous, TPWorker, node_id, build_rank, weight_bytes

LOOPBACK = "127.0.0.1"


class WorkerFailed(RuntimeError):
    """A tensor-parallel worker could not start or died: the model cannot step any more."""


class TPExecutor:
    def __init__(self, model_path: Path, config: EngineConfig, shards: list[RankShard], num_blocks: int,
                 workers: str = "ray"):
        one_node = workers == "threads" or config.placement_strategy == "STRICT_PACK"
        use_shm = config.tp_all_reduce == "shm" or (config.tp_all_reduce == "auto" and one_node)
        host = LOOPBACK if one_node else _node_ip()
        rendezvous = Rendezvous(host, _free_port(host), f"rayfoundry-tp-{uuid.uuid4().hex[:12]}" if use_shm else None,
                                config.tp_timeout_s)
        spawn = ThreadWorker if workers == "threads" else RayWorkers(config, len(shards)).spawn
        self.workers = [spawn(str(model_path), config, shard, rendezvous, num_blocks) for shard in shards[1:]]
        self.runner, self._load_peak = _build_rank_zero(model_path, config, shards[0], rendezvous, num_blocks,
                                                        self.workers)
        self.model = self.runner.model
        self.messages = StepMessageBuilder()
        self.timeout_s = config.tp_timeout_s
        self.message_s = 0.0

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
        """Raise if a worker died, even while no step runs (Serve calls this every few seconds)."""
        self._raise_worker_failure()
        for worker in self.workers:
            worker.ping(self.timeout_s)

    def _raise_worker_failure(self) -> None:
        for worker in self.workers:
            worker.raise_if_failed()

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.stop()


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
        raise result["error"]
    for worker in workers:
        worker.wait_started()
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

    def wait_started(self) -> None:
        self._started.wait()
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
        if self.group is None:
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
        self._ray = ray

    def submit(self, message) -> None:
        self._pending.append(self.actor.execute.remote(message))

    def raise_if_failed(self, starting: bool = False) -> None:
        refs = [self._ready] if starting else self._pending
        done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        try:
            self._ray.get(done)
        except Exception as error:
            raise WorkerFailed(f"tensor-parallel worker failed: {error}") from error
        if not starting:
            self._pending = [ref for ref in self._pending if ref not in done]

    def wait_started(self) -> None:
        self._ray.get(self._ready)

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


def _node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
