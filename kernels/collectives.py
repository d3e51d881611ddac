"""The collectives a tensor-parallel model calls inside its forward, behind one small face.

`SingleGroup` (tp=1) makes them no-ops, so the model has one code path. `GlooGroup` is a
torch.distributed process group built from a TCPStore of its own, not `init_process_group`: a Serve
replica (or a test, or a benchmark) may hold several engines, and none of them may own the process's
one global group. On one node its sum can go through our shared-memory all-reduce instead
(kernels.shm_all_reduce): gloo over loopback TCP costs ~0.35 ms a call, and a decode step calls it
twice per layer.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CollectiveTimes:
    """Seconds spent in collectives and how many calls: the benchmark's share of step time."""

    seconds: float = 0.0
    calls: int = 0


class SingleGroup:
    rank, size = 0, 1

    def __init__(self):
        self.times = CollectiveTimes()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_to_first(self, tensor: torch.Tensor, widths: list[int]) -> torch.Tensor | None:
        return tensor


@dataclass
class GlooGroup:
    """A gloo group over `size` ranks that meet at rank 0's TCPStore on (host, port)."""

    host: str
    port: int
    rank: int
    size: int
    timeout_s: float = 60.0
    shm_name: str | None = None  # sums through shared memory (all ranks on one node)
    device_host: str | None = None  # this rank's own address for gloo's connections (default: host)
    times: CollectiveTimes = field(default_factory=CollectiveTimes)

    def __post_init__(self):
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self._store = dist.TCPStore(self.host, self.port, self.size, is_master=self.rank == 0, timeout=timeout)
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.device_host or self.host)]
        options._timeout = timeout
        self._group = dist.ProcessGroupGloo(self._store, self.rank, self.size, options)
        self._shm = None
        if self.shm_name is not None:
            from kernels.shm_all_reduce import ShmAllReduce
            self._shm = ShmAllReduce(self.shm_name, self.rank, self.size, timeout_s=self.timeout_s)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        if self._shm is not None and _shm_can_sum(tensor):
            self._shm.all_reduce_(tensor)
        else:
            self._group.allreduce([tensor]).wait()
        self._count(started)
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place max over ranks (W8A8's per-token scales, twice a layer). Through shared memory as a
        sum: each rank's values in its own row of zeros, so the sum is every rank's value exactly."""
        started = time.perf_counter()
        if self._shm is not None and _shm_can_sum(tensor):
            stacked = tensor.new_zeros((self.size, *tensor.shape))
            stacked[self.rank] = tensor
            torch.amax(self._shm.all_reduce_(stacked), dim=0, out=tensor)
        else:
            options = dist.AllreduceOptions()
            options.reduceOp = dist.ReduceOp.MAX
            self._group.allreduce([tensor], options).wait()
        self._count(started)
        return tensor

    def gather_to_first(self, tensor: torch.Tensor, widths: list[int]) -> torch.Tensor | None:
        """Every rank's [N, widths[rank]] side by side on rank 0 ([N, sum(widths)]); None elsewhere.
        Gloo gathers equal shapes, so shards are padded to the widest and trimmed after."""
        if tensor.numel() == 0:  # a step with no logit rows (a prefill chunk): every rank knows it
            return tensor.new_empty(tensor.shape[0], sum(widths)) if self.rank == 0 else None
        started = time.perf_counter()
        widest = max(widths)
        padded = torch.nn.functional.pad(tensor, (0, widest - tensor.shape[-1])).contiguous()
        options = dist.GatherOptions()
        options.rootRank = 0
        outputs = [[torch.empty_like(padded) for _ in range(self.size)]] if self.rank == 0 else []
        self._group.gather(outputs, [padded], options).wait()
        self._count(started)
        if self.rank != 0:
            return None
        return torch.cat([part[..., :width] for part, width in zip(outputs[0], widths)], dim=-1)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()

    def _count(self, started: float) -> None:
        self.times.seconds += time.perf_counter() - started
        self.times.calls += 1


def _shm_can_sum(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.bfloat16) and tensor.is_contiguous()
