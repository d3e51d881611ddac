"""All-reduce (sum) through shared memory, between the ranks of one tensor-parallel replica on one
machine: a few microseconds a call for decode-sized tensors, where gloo over loopback TCP takes a
third of a millisecond or more (`python -m kernels.shm_all_reduce` measures both).

The segment. Rank 0 creates /dev/shm/<name> fully formed (an unnamed file, its memory reserved and
its header written, then linked in under its name); the others open it, retrying until timeout_s. Each rank maps it and records its pid;
the name is unlinked as soon as every rank has (by whichever rank sees that last, and by every rank
after its first completed call), so a SIGKILLed replica leaves nothing behind: the memory goes with
the last mapping. Layout (the C++ side, kernels/csrc/shm_all_reduce_cpu.cpp, reads the same):

    0            header: magic, world_size, slot_bytes; at 64 the abort word (0 while healthy)
    4096         one 128-byte control block per rank: its published step, pid, pid namespace, and
                 the (numel, dtype) of the call each step parity belongs to
    data_offset  2 x world_size slots of slot_bytes (max_bytes rounded up to whole pages)

The protocol. A call is cut into steps of at most slot_bytes; steps are numbered 1, 2, ... over the
segment's life. In step s a rank copies its chunk into its slot of parity s % 2, stores s as its
published step (release), waits until every rank's published step is >= s (acquire), then sums the
n slots of that parity in rank order (0, 1, ..., n-1; in float32 for bfloat16) into its own tensor.
Every rank performs the same additions in the same order, so all get bit-identical results, equal to
all_reduce_reference's.

Why two slots per rank, and why no second flag: a rank overwrites its slot of parity s % 2 in step
s + 2, which it starts only after seeing every rank publish s + 1; a rank publishes s + 1 only after
it finished summing step s. So nobody still reads what is overwritten, and no rank can run more than
one step ahead of the slowest. The call's (numel, dtype) travel with each step, so ranks that call
with different tensors fail loudly instead of summing garbage.

Waiting spins briefly with a pause instruction, then yields the core (ranks may outnumber cores)
until 1 ms has passed, then naps 50 us at a time; all along it checks the abort word, its deadline (timeout_s since the wait
began) and, every 100 ms, whether a rank it waits for has died. Any of these sets the abort word if
still unset, so every rank's current and later calls raise CollectiveAborted naming the first cause.
abort() and close() set it too, from any thread (the wait runs without the GIL).

Without the C++ kernels (build failed, RAYFOUNDRY_NATIVE_KERNELS=0) the same protocol runs in torch
ops: some 0.15 ms a call (a few dozen small torch ops per step), still below gloo, and on x86 only,
as it relies on x86 keeping plain stores, and loads, in program order.
"""
from __future__ import annotations

import functools
import mmap
import os
import platform
import statistics
import struct
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.cpu_ops import native_ops

SHM_DIR = Path("/dev/shm")
MAGIC = 0x3152415F4D485346  # "FSHM_AR1" little-endian
PAGE = 4096
HEADER_FORMAT = "<QQQ"  # magic, world_size, slot_bytes
ABORT_WORD_OFFSET = 64
CONTROL_OFFSET = PAGE
CONTROL_BYTES_PER_RANK = 128
WORDS_PER_RANK = CONTROL_BYTES_PER_RANK // 8
# int64 words of a rank's control block
PUBLISHED_STEP, PID, PID_NAMESPACE, CALL_NUMEL, CALL_DTYPE = 0, 1, 2, 3, 5  # CALL_*: + step parity
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2}
ABORT_CALLED, TIMED_OUT, PEER_DIED, MISMATCH, CLOSED = 1, 2, 3, 4, 5


class CollectiveAborted(RuntimeError):
    """The collective ended without a result: abort() or close() on some rank, a rank's deadline
    passed, a rank died, or the ranks called with different tensors. Later calls raise it too."""


def all_reduce_reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum in rank order, in float32, cast back to the inputs' dtype: what every rank gets."""
    total = tensors[0].to(torch.float32, copy=True)
    for tensor in tensors[1:]:
        total += tensor.to(torch.float32)
    return total.to(tensors[0].dtype)


@dataclass(frozen=True)
class _Layout:
    world_size: int
    slot_bytes: int

    @property
    def data_offset(self) -> int:
        return CONTROL_OFFSET + _round_up(self.world_size * CONTROL_BYTES_PER_RANK, PAGE)

    @property
    def total_bytes(self) -> int:
        return self.data_offset + 2 * self.world_size * self.slot_bytes


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pid_namespace() -> int:
    """Peers judge this rank's pid only from the same pid namespace (0: unknown, never judged)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _create_segment(path: Path, layout: _Layout) -> int:
    """A file holding the header, linked in under `path` only once written: an opener never sees a
    half-made segment. Refuses a name already in use."""
    fd, temporary = _new_unnamed_file(path.parent)
    try:
        _reserve(fd, layout.total_bytes)
        os.pwrite(fd, struct.pack(HEADER_FORMAT, MAGIC, layout.world_size, layout.slot_bytes), 0)
        _link(fd, temporary, path)
    except FileExistsError:
        os.close(fd)
        raise FileExistsError(f"{path} exists already: the all-reduce's name must be unique per replica") from None
    except BaseException:
        os.close(fd)
        raise
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    return fd


def _reserve(fd: int, size: int) -> None:
    """All of the segment's memory, now: a tmpfs too small for it (Docker's /dev/shm is 64 MB by
    default) fails here, clearly, rather than killing a rank with SIGBUS on first touching a page."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        raise OSError(error.errno, f"cannot reserve {size / 2 ** 20:.1f} MiB in {SHM_DIR} (2 x world_size x max_bytes): "
                      f"{error.strerror}; give the machine or container a larger /dev/shm, or lower max_bytes") from None


def _new_unnamed_file(directory: Path) -> tuple[int, Path | None]:
    """An open file without a name (O_TMPFILE: nothing to leak if this process dies now), or, where
    the file system cannot, one with a unique temporary name."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600), None
    except (AttributeError, OSError):
        temporary = directory / f".shm-all-reduce.{os.getpid()}.{threading.get_ident()}.tmp"
        return os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), temporary


def _link(fd: int, temporary: Path | None, path: Path) -> None:
    if temporary is not None:
        os.link(temporary, path)
        return
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:  # given a directory fd, os.link calls linkat(AT_SYMLINK_FOLLOW), which names an O_TMPFILE file
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _open_segment(path: Path, layout: _Layout, rank: int, timeout_s: float) -> int:
    """Opens rank 0's segment, waiting for it until timeout_s, and checks it was made for this
    replica's shape."""
    deadline, nap = time.monotonic() + timeout_s, 0.001
    while True:
        try:
            fd = os.open(path, os.O_RDWR)
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise CollectiveAborted(f"rank {rank}: no {path} after {timeout_s} s; rank 0 of this replica has not "
                                        "created it (not started, failed, or another name)") from None
            time.sleep(nap)
            nap = min(2 * nap, 0.05)
    magic, world_size, slot_bytes = struct.unpack(HEADER_FORMAT, os.pread(fd, struct.calcsize(HEADER_FORMAT), 0))
    if magic != MAGIC or (world_size, slot_bytes) != (layout.world_size, layout.slot_bytes) \
            or os.fstat(fd).st_size < layout.total_bytes:
        os.close(fd)
        raise ValueError(f"{path} was made for world_size={world_size}, slot_bytes={slot_bytes}; rank {rank} expects "
                         f"world_size={layout.world_size}, slot_bytes={layout.slot_bytes} (same max_bytes everywhere?)")
    return fd


def _check_reducible(tensor: torch.Tensor) -> None:
    # the cheapest properties first: this runs on every call, in a latency measured in microseconds
    if not (isinstance(tensor, torch.Tensor) and tensor.is_cpu and tensor.layout == torch.strided
            and tensor.dtype in DTYPE_CODES and tensor.is_contiguous()):
        raise ValueError(_why_not_reducible(tensor))


def _why_not_reducible(tensor) -> str:
    if not isinstance(tensor, torch.Tensor):
        return f"all_reduce_ takes a torch.Tensor, got {type(tensor).__name__}"
    if not tensor.is_cpu or tensor.layout != torch.strided:
        return f"all_reduce_ takes a dense CPU tensor, got {tensor.device} {tensor.layout}"
    if tensor.dtype not in DTYPE_CODES:
        return f"all_reduce_ takes float32 or bfloat16, got {tensor.dtype}"
    return "all_reduce_ reduces in place and needs a contiguous tensor"


def _encode_abort(reason: int, origin: int, subject: int) -> int:
    """The abort word: why, who noticed, whom it concerns (as the C++ side's encode_abort)."""
    return reason | (origin + 1) << 8 | (subject + 1) << 16


def _explain(word: int) -> str:
    reason, origin, subject = word & 0xFF, (word >> 8 & 0xFF) - 1, (word >> 16 & 0xFF) - 1
    return {
        ABORT_CALLED: f"rank {origin} called abort()",
        TIMED_OUT: f"rank {origin} waited timeout_s for rank {subject} in vain",
        PEER_DIED: f"rank {subject}'s process died (seen by rank {origin})",
        MISMATCH: f"rank {origin} and rank {subject} called with different sizes or dtypes",
        CLOSED: f"rank {origin} closed its end",
    }.get(reason, f"unknown abort word {word:#x}")


@functools.cache
def _warn_torch_fallback() -> None:
    warnings.warn("shared-memory all-reduce: C++ kernels unavailable, using its torch fallback (slower)", stacklevel=3)


class _NativeSteps:
    """The protocol's steps in C++ (kernels/csrc/shm_all_reduce_cpu.cpp)."""

    def __init__(self, ops, segment: torch.Tensor):
        self._reduce, self._abort, self._segment = ops.shm_all_reduce_, ops.shm_abort, segment

    def all_reduce_(self, tensor: torch.Tensor, rank: int, timeout_s: float) -> int:
        return self._reduce(self._segment, tensor, rank, timeout_s)

    def abort(self, reason: int, rank: int) -> int:
        return self._abort(self._segment, reason, rank)


class _TorchSteps:
    """The same steps in torch ops. Correct on x86 only: a step number is published with a plain
    8-byte store after the chunk's stores, and x86 keeps stores (and loads) in program order."""

    def __init__(self, segment: torch.Tensor, layout: _Layout):
        self._layout = layout
        self._abort_word = segment[ABORT_WORD_OFFSET:ABORT_WORD_OFFSET + 8].view(torch.int64)
        end = CONTROL_OFFSET + layout.world_size * CONTROL_BYTES_PER_RANK
        self._control = segment[CONTROL_OFFSET:end].view(torch.int64).view(layout.world_size, WORDS_PER_RANK)
        self._data = segment[layout.data_offset:]

    def _slot(self, step: int, rank: int) -> torch.Tensor:
        start = ((step & 1) * self._layout.world_size + rank) * self._layout.slot_bytes
        return self._data[start:start + self._layout.slot_bytes]

    def _raise_abort(self, word: int) -> int:
        if not int(self._abort_word):  # no compare-and-swap in torch: a near-simultaneous cause may win instead
            self._abort_word.fill_(word)
        return int(self._abort_word)

    def abort(self, reason: int, rank: int) -> int:
        return self._raise_abort(_encode_abort(reason, rank, rank))

    def _wait(self, rank: int, step: int, timeout_s: float) -> int:
        """Yields the core between polls (a poll costs microseconds here), naps once it is long."""
        deadline, polls = time.monotonic() + timeout_s, 0
        while bool((laggards := self._control[:, PUBLISHED_STEP] < step).any()):
            if word := int(self._abort_word):
                return word
            if time.monotonic() >= deadline:
                return self._raise_abort(_encode_abort(TIMED_OUT, rank, int(laggards.nonzero()[0])))
            polls += 1
            if polls < 1000:
                os.sched_yield()
            else:
                time.sleep(50e-6)
        return 0

    def all_reduce_(self, tensor: torch.Tensor, rank: int, timeout_s: float) -> int:
        if word := int(self._abort_word):
            return word
        values, size, code = tensor.view(-1), tensor.element_size(), DTYPE_CODES[tensor.dtype]
        raw, own = values.view(torch.uint8), self._control[rank]
        per_step, step = self._layout.slot_bytes // size, int(own[PUBLISHED_STEP])
        for begin in range(0, values.numel(), per_step):
            step += 1
            count = min(per_step, values.numel() - begin)
            self._slot(step, rank)[:count * size].copy_(raw[begin * size:(begin + count) * size])
            own[CALL_NUMEL + (step & 1)], own[CALL_DTYPE + (step & 1)] = values.numel(), code
            own[PUBLISHED_STEP] = step
            if word := self._wait(rank, step, timeout_s):
                return word
            calls = self._control[:, [CALL_NUMEL + (step & 1), CALL_DTYPE + (step & 1)]]
            if bool((disagreeing := (calls != calls[rank]).any(1)).any()):
                return self._raise_abort(_encode_abort(MISMATCH, rank, int(disagreeing.nonzero()[0])))
            slots = [self._slot(step, r)[:count * size].view(tensor.dtype) for r in range(self._layout.world_size)]
            values[begin:begin + count].copy_(all_reduce_reference(slots))
        return 0


class ShmAllReduce:
    """One rank's end of a replica's shared-memory all-reduce. Construct on every rank with the same
    name, world_size and max_bytes; rank 0 creates the segment, the others wait for it up to
    timeout_s. all_reduce_ is meant for one thread at a time (calls are serialised); abort() and
    close() may come from any thread."""

    def __init__(self, name: str, rank: int, world_size: int, timeout_s: float = 60.0, max_bytes: int = 4 << 20):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        if not 0 <= rank < world_size or world_size > 254 or max_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"need 0 <= rank < world_size <= 254, max_bytes >= 1, timeout_s > 0; got rank={rank}, "
                             f"world_size={world_size}, max_bytes={max_bytes}, timeout_s={timeout_s}")
        self.name, self.rank, self.world_size, self.timeout_s = name, rank, world_size, timeout_s
        self.path = SHM_DIR / name
        ops = native_ops()
        if ops is None and platform.machine() not in ("x86_64", "AMD64"):
            raise RuntimeError("the shared-memory all-reduce needs the C++ kernels on this CPU (weakly ordered memory)")
        self.native = ops is not None
        self._call_lock, self._mapping_lock = threading.Lock(), threading.Lock()
        self._unlinked = False
        layout = _Layout(world_size, _round_up(max_bytes, PAGE))
        fd = _create_segment(self.path, layout) if rank == 0 else _open_segment(self.path, layout, rank, timeout_s)
        try:
            self._mapping = mmap.mmap(fd, layout.total_bytes)
        except BaseException:
            self._unlink()
            raise
        finally:
            os.close(fd)
        segment = torch.frombuffer(self._mapping, dtype=torch.uint8)
        if ops is None:
            _warn_torch_fallback()
        self._steps = _NativeSteps(ops, segment) if ops is not None else _TorchSteps(segment, layout)
        end = CONTROL_OFFSET + world_size * CONTROL_BYTES_PER_RANK
        self._control = segment[CONTROL_OFFSET:end].view(torch.int64).view(world_size, WORDS_PER_RANK)
        self._attach()

    def _attach(self) -> None:
        """Records this rank's pid (peers watch it while waiting), and unlinks the name if every rank
        has now mapped the segment. Two ranks attaching at once may both miss the other; the first
        completed call unlinks then."""
        own = self._control[self.rank]
        own[PID_NAMESPACE] = _pid_namespace()
        own[PID] = os.getpid()
        if bool((self._control[:, PID] != 0).all()):
            self._unlink()

    def _unlink(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass  # another rank was first
        self._unlinked = True

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the ranks, in place, and returns it. Raises ValueError for a tensor it
        cannot reduce (before any rank waits on it), CollectiveAborted when the collective ended."""
        _check_reducible(tensor)
        with self._call_lock:
            if self._steps is None:
                raise CollectiveAborted(f"rank {self.rank}'s all-reduce {self.name} is closed")
            word = self._steps.all_reduce_(tensor, self.rank, self.timeout_s)
        if word:
            raise CollectiveAborted(f"all-reduce {self.name} aborted: {_explain(word)}")
        if not self._unlinked:
            self._unlink()  # a call completed, so every rank has mapped the segment
        return tensor

    def abort(self) -> None:
        """Ends the collective for every rank: calls in progress raise CollectiveAborted promptly,
        later ones at once. Safe from any thread, also after close()."""
        with self._mapping_lock:
            if self._steps is not None:
                self._steps.abort(ABORT_CALLED, self.rank)

    def close(self) -> None:
        """Leaves the collective (peers' calls raise CollectiveAborted, as they could never complete)
        and unmaps the segment, after a call in progress on another thread has ended."""
        with self._mapping_lock:
            if self._steps is None:
                return
            self._steps.abort(CLOSED, self.rank)
        with self._call_lock, self._mapping_lock:
            self._steps = self._control = None
            try:
                self._mapping.close()
            except BufferError:
                pass  # a view of the segment is still referenced somewhere; the mapping goes with it
        self._unlink()

    def __enter__(self) -> ShmAllReduce:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --- micro-benchmark: python -m kernels.shm_all_reduce ------------------------------------------

BENCH_SHAPES = {"2.3 KB": (1, 576), "73 KB": (32, 576), "1.2 MB": (512, 576)}


def _latencies(reduce, tensor: torch.Tensor, calls: int) -> tuple[float, float]:
    """(median, mean) seconds per call: the median shows the collective itself, the mean also what
    other load on the machine costs it."""
    for _ in range(min(calls, 50)):
        reduce(tensor)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        reduce(tensor)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), statistics.fmean(samples)


def _benchmark_rank(rank: int, world_size: int, name: str, store_file: str, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    shm = ShmAllReduce(name, rank, world_size)
    row = {}
    for label, shape in BENCH_SHAPES.items():
        calls = 300 if shape[0] > 32 else 3000
        tensor = torch.randn(shape)
        row[label] = (_latencies(shm.all_reduce_, tensor, calls), _latencies(dist.all_reduce, tensor, calls // 3))
    shm.close()
    dist.destroy_process_group()
    results.put((rank, row))


def benchmark(world_size: int = 2) -> dict:
    """Per-call latency of this all-reduce and of gloo over loopback TCP, on rank 0, for float32
    tensors of the sizes tensor-parallel decode sums; printed as a table, returned as
    {size: ((shm median, shm mean), (gloo median, gloo mean))} in seconds."""
    import multiprocessing
    import tempfile
    import uuid

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as scratch:
        name, store = f"rayfoundry-bench-{uuid.uuid4().hex}", os.path.join(scratch, "store")
        ranks = [context.Process(target=_benchmark_rank, args=(r, world_size, name, store, results))
                 for r in range(world_size)]
        for process in ranks:
            process.start()
        rows = dict(results.get(timeout=300) for _ in ranks)
        for process in ranks:
            process.join()
    print(f"all-reduce latency per call, {world_size} ranks, float32, 1 torch thread per rank: median (mean)")
    print(f"{'size':>8} {'shared memory':>22} {'gloo (TCP lo)':>22} {'speed-up':>9}")
    for label, ((shm_median, shm_mean), (gloo_median, gloo_mean)) in rows[0].items():
        print(f"{label:>8} {shm_median * 1e6:>9.1f} us ({shm_mean * 1e6:>6.1f}) "
              f"{gloo_median * 1e6:>9.1f} us ({gloo_mean * 1e6:>6.1f}) {gloo_median / shm_median:>8.1f}x")
    return rows[0]


if __name__ == "__main__":
    benchmark()
