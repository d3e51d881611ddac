"""One tensor-parallel rank: its share of the model and of the KV cache, stepping as rank 0 says.

Rank 0 lives in the engine's process; ranks 1.. are `TPWorker`s, as Ray actors (a replica's
placement group) or, for tests and benchmarks on one machine, threads of the engine's process.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from serve_apps.engine.config import EngineConfig
from serve_apps.engine.model_runner import ModelRunner
from kernels.collectives import GlooGroup
from serve_apps.engine.models.tp_layout import RankShard
from serve_apps.engine.step_message import StepMessage, WorkerRequests


LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one model meet (rank 0's TCPStore) and the shared-memory name they share."""

    host: str
    port: int
    shm_name: str | None
    timeout_s: float


@dataclass(frozen=True)
class RankInfo:
    rank: int
    node_id: str
    pid: int
    weight_bytes: int  # the model's persistent state on this rank (a tied tensor once)
    load_peak_bytes: int  # anonymous memory the load added at its peak (RssAnon, sampled)


def build_rank(model_path: Path, config: EngineConfig, shard: RankShard, rendezvous: Rendezvous,
               num_blocks: int) -> tuple[ModelRunner, int]:
    """A rank's model runner, its collectives joined; and the peak anonymous memory its load added."""
    from serve_apps.engine.models.loader import load_model

    # gloo connects each rank at its own address: loopback on one node, the node's address across nodes
    device_host = rendezvous.host if rendezvous.host == LOOPBACK else node_ip()
    group = GlooGroup(rendezvous.host, rendezvous.port, shard.rank, shard.size, rendezvous.timeout_s,
                      rendezvous.shm_name, device_host=device_host)
    with PeakAnonMemory() as peak:
        model = load_model(model_path, getattr(torch, config.dtype), config.prepack_weights, shard, group)
    return ModelRunner(model, num_blocks, config.block_size), peak.added


def node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # tied tensors once
    return sum(t.numel() * t.element_size() for t in tensors.values())


class TPWorker:
    """Ranks 1..tp-1: build the rank, then run each step's forward (rank 0 samples)."""

    def __init__(self, model_path: str, config: EngineConfig, shard: RankShard, rendezvous: Rendezvous,
                 num_blocks: int, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.rank = shard.rank
        self.runner, self._load_peak = build_rank(Path(model_path), config, shard, rendezvous, num_blocks)
        self.requests = WorkerRequests()

    def info(self) -> RankInfo:
        return RankInfo(self.rank, node_id(), os.getpid(), weight_bytes(self.runner.model), self._load_peak)

    def execute(self, message: StepMessage) -> None:
        self.runner.forward(self.requests.apply(message))


def node_id() -> str:
    """This process's Ray node, or "local" outside Ray (threads of a process that never started Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class PeakAnonMemory:
    """Peak of this process's anonymous resident memory (RssAnon) over a block, above where it began.
    Not ru_maxrss: that counts the checkpoint's pages mapped from disk, which are not the model's."""

    def __init__(self, period_s: float = 0.002):
        self.period_s, self.added = period_s, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakAnonMemory:
        self._start = self._peak = _rss_anon()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_anon())
            time.sleep(self.period_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.added = max(self._peak, _rss_anon()) - self._start


def _rss_anon() -> int:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
