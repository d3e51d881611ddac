"""The shared-memory all-reduce between ranks in separate processes (spawned, as Ray actors are), and
between threads of one process where a process boundary adds nothing (the wait runs without the GIL):
sums equal to the reference and bit-identical on every rank, chunking, hundreds of calls in a row with
fresh data (the slot-reuse race), tensors it must refuse, abort from another thread, a killed peer,
the deadline, and no segment left in /dev/shm afterwards."""
import hashlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
import uuid

import pytest
import torch

from kernels.cpu_ops import native_ops
from kernels.shm_all_reduce import SHM_DIR, CollectiveAborted, ShmAllReduce, all_reduce_reference

SPAWN = multiprocessing.get_context("spawn")
# float32 elements: one, a few, odd, a decode step of 32 tokens at hidden 576 (73 KB), odd and chunked
SIZES = [1, 7, 577 * 3, (32, 576), 12_345]


@pytest.fixture(scope="module", autouse=True)
def _kernels_built():
    """Built (or loaded) here once, so the spawned ranks only load it; and the native path is the one
    under test on this machine."""
    assert native_ops() is not None


def unique_name() -> str:
    return f"rayfoundry-test-{uuid.uuid4().hex}"


def rank_input(call: int, rank: int, shape=None) -> torch.Tensor:
    """Different data for every call and rank, so a slot read too early or too late shows."""
    generator = torch.Generator().manual_seed(call * 1000 + rank)
    shape = shape or SIZES[call % len(SIZES)]
    dtype = torch.bfloat16 if call // len(SIZES) % 2 else torch.float32
    return (torch.randn(shape, generator=generator) * (rank + 1)).to(dtype)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _sum_many(rank: int, world_size: int, name: str, max_bytes: int, calls: int, shapes: list, native: bool):
    """Rank `rank`'s side: `calls` reductions of varied sizes (then `shapes`), each checked against
    the reference; returns the digests of its results, for the parent to compare across ranks.
    native=False: with the C++ kernels hidden, as when their build failed."""
    import kernels.shm_all_reduce as module

    real_native_ops = module.native_ops
    module.native_ops = real_native_ops if native else lambda: None
    try:
        shm = ShmAllReduce(name, rank, world_size, timeout_s=30, max_bytes=max_bytes)
    finally:
        module.native_ops = real_native_ops
    digests = []
    with shm:
        assert shm.native == native
        plan = [(call, None) for call in range(calls)] + [(calls + i, shape) for i, shape in enumerate(shapes)]
        for call, shape in plan:
            inputs = [rank_input(call, r, shape) for r in range(world_size)]
            tensor = inputs[rank].clone()
            assert shm.all_reduce_(tensor) is tensor
            assert torch.equal(tensor, all_reduce_reference(inputs)), f"call {call}: differs from the reference"
            digests.append(digest(tensor))
    return digests


def _serve_scenarios(rank: int, connection) -> None:
    """A pooled rank process: runs (scenario, args) commands until it gets None."""
    torch.set_num_threads(1)  # ranks outnumber cores here
    while (command := connection.recv()) is not None:
        scenario, args = command
        try:
            connection.send(("ok", scenario(rank, *args)))
        except BaseException:  # noqa: BLE001 - the parent reports it
            connection.send(("error", traceback.format_exc()))


class RankPool:
    """Spawned processes serving as ranks 0, 1, ...: torch is imported once per process for the
    whole file, not once per test. One pipe each, so killing one disturbs no other; a dead one is
    replaced when next needed."""

    def __init__(self, size: int):
        self._ranks = {}
        self.processes(size)

    def processes(self, count: int) -> list:
        for rank in range(count):
            if rank not in self._ranks or not self._ranks[rank][0].is_alive():
                ours, theirs = SPAWN.Pipe()
                process = SPAWN.Process(target=_serve_scenarios, args=(rank, theirs), daemon=True)
                process.start()
                self._ranks[rank] = (process, ours)
        return [self._ranks[rank][0] for rank in range(count)]

    def start(self, scenario, world_size: int, *args) -> None:
        """Runs scenario(rank, world_size, *args) on ranks 0 .. world_size - 1."""
        self.processes(world_size)
        for rank in range(world_size):
            self._ranks[rank][1].send((scenario, (world_size, *args)))

    def result(self, rank: int, timeout: float = 60):
        connection = self._ranks[rank][1]
        assert connection.poll(timeout), f"rank {rank} gave no result within {timeout} s"
        status, value = connection.recv()
        assert status == "ok", f"rank {rank}:\n{value}"
        return value

    def run(self, scenario, world_size: int, *args) -> list:
        self.start(scenario, world_size, *args)
        return [self.result(rank) for rank in range(world_size)]

    def close(self) -> None:
        for process, connection in self._ranks.values():
            if process.is_alive():
                connection.send(None)
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture(scope="module")
def ranks():
    pool = RankPool(4)
    yield pool
    pool.close()


@pytest.mark.parametrize("world_size", [2, 3])
def test_sums_equal_the_reference_and_every_rank_gets_the_same_bits(ranks, world_size):
    """240 calls in a row, float32 and bfloat16, odd sizes, a buffer of 16 KiB so that most calls take
    several chunks; every rank checks against the reference, and all ranks' results are identical."""
    name = unique_name()
    digests = ranks.run(_sum_many, world_size, name, 16 << 10, 240, [], True)
    assert all(rank_digests == digests[0] for rank_digests in digests)
    assert not (SHM_DIR / name).exists()


def test_four_ranks_on_two_cores_with_the_default_buffer(ranks):
    """More ranks than cores (waiters must yield, not spin), and tensors of 1.2 MB and of 5.2 MB, past
    the default 4 MiB buffer."""
    name = unique_name()
    digests = ranks.run(_sum_many, 4, name, 4 << 20, 200, [(512, 576), (1_310_721,)], True)
    assert all(rank_digests == digests[0] for rank_digests in digests)
    assert not (SHM_DIR / name).exists()


def test_the_torch_fallback_gives_the_same_sums(ranks):
    """Without the C++ kernels the same protocol runs in torch ops."""
    name = unique_name()
    digests = ranks.run(_sum_many, 2, name, 16 << 10, 30, [(512, 576)], False)
    assert digests[0] == digests[1]
    assert not (SHM_DIR / name).exists()


def in_threads(calls) -> list:
    """Runs each callable in its own thread (one per rank); returns their results or exceptions."""
    outcomes = [None] * len(calls)

    def run(index):
        try:
            outcomes[index] = calls[index]()
        except Exception as error:  # noqa: BLE001 - returned to the test
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


def test_special_values_round_like_torch():
    """Infinities, NaN, denormals, ties at bfloat16's rounding: the same bits as the reference (NaN
    included, compared as bits), on both ranks."""
    inf, nan = float("inf"), float("nan")
    first = torch.tensor([inf, inf, nan, 1e-40, -1e-40, 3e38, 1.0, 1.00390625, 1.01171875, 2.0 ** -133, 0.0] * 3)
    second = torch.tensor([-inf, 1.0, 1.0, 1e-40, 0.0, 3e38, 2.0 ** -9, 2.0 ** -9, 2.0 ** -9, 2.0 ** -133, -0.0] * 3)
    name = unique_name()
    with ShmAllReduce(name, 0, 2) as rank0, ShmAllReduce(name, 1, 2) as rank1:
        for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
            inputs = [first.to(dtype), second.to(dtype)]
            outputs = [inputs[0].clone(), inputs[1].clone()]
            in_threads([lambda: rank0.all_reduce_(outputs[0]), lambda: rank1.all_reduce_(outputs[1])])
            expected = all_reduce_reference(inputs).view(bits)
            assert torch.equal(outputs[0].view(bits), expected) and torch.equal(outputs[1].view(bits), expected)
    assert not (SHM_DIR / name).exists()


@pytest.mark.parametrize("bad", [
    torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float16),
    torch.zeros(4, 6).t(), torch.zeros(4, device="meta"), torch.zeros(4).to_sparse(), [1.0, 2.0],
], ids=["int32", "float64", "float16", "non-contiguous", "meta-device", "sparse", "list"])
def test_refuses_what_it_cannot_reduce(bad):
    with ShmAllReduce(unique_name(), 0, 1) as shm:
        with pytest.raises(ValueError):
            shm.all_reduce_(bad)
        fine = torch.arange(5.0)
        assert torch.equal(shm.all_reduce_(fine), torch.arange(5.0))  # a sum over one rank; still usable


def test_after_close_calls_raise_and_nothing_is_left():
    name = unique_name()
    shm = ShmAllReduce(name, 0, 2)  # its peer never comes: the name stays until close
    assert (SHM_DIR / name).exists()
    shm.close()
    assert not (SHM_DIR / name).exists()
    with pytest.raises(CollectiveAborted, match="closed"):
        shm.all_reduce_(torch.ones(3))
    shm.abort()  # harmless now
    shm.close()


def test_abort_from_another_thread_ends_a_wait_promptly():
    """Rank 1 maps the segment but never calls; rank 0 waits (timeout 60 s) until another thread of
    its process calls abort(). Every later call, on either rank, raises at once."""
    name = unique_name()
    with ShmAllReduce(name, 0, 2, timeout_s=60) as rank0, ShmAllReduce(name, 1, 2, timeout_s=60) as rank1:
        aborted_at = []
        aborter = threading.Timer(0.3, lambda: (aborted_at.append(time.monotonic()), rank0.abort()))
        aborter.start()
        with pytest.raises(CollectiveAborted, match="rank 0 called abort"):
            rank0.all_reduce_(torch.ones(10))
        assert time.monotonic() - aborted_at[0] < 0.5
        for rank in (rank0, rank1):
            start = time.monotonic()
            with pytest.raises(CollectiveAborted, match="abort"):
                rank.all_reduce_(torch.ones(10))
            assert time.monotonic() - start < 0.1
    assert not (SHM_DIR / name).exists()


def test_a_peer_that_never_calls_ends_the_wait_at_the_deadline():
    name = unique_name()
    with ShmAllReduce(name, 0, 2, timeout_s=1.0) as rank0, ShmAllReduce(name, 1, 2, timeout_s=1.0):
        start = time.monotonic()
        with pytest.raises(CollectiveAborted, match="rank 0 waited timeout_s for rank 1"):
            rank0.all_reduce_(torch.ones(10, dtype=torch.bfloat16))
        assert 0.9 < time.monotonic() - start < 3
    assert not (SHM_DIR / name).exists()


def test_a_rank_whose_rank_0_never_starts_gives_up_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(CollectiveAborted, match="no /dev/shm/.* after 0.5 s"):
        ShmAllReduce(unique_name(), 1, 2, timeout_s=0.5)
    assert time.monotonic() - start < 2


def test_ranks_calling_with_different_tensors_fail_loudly():
    name = unique_name()
    with ShmAllReduce(name, 0, 2) as rank0, ShmAllReduce(name, 1, 2) as rank1:
        outcomes = in_threads([lambda: rank0.all_reduce_(torch.ones(10)), lambda: rank1.all_reduce_(torch.ones(11))])
    assert all(isinstance(outcome, CollectiveAborted) and "different sizes" in str(outcome) for outcome in outcomes)


def test_a_dev_shm_too_small_fails_clearly_and_leaves_nothing(monkeypatch):
    def no_space(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    name = unique_name()
    with pytest.raises(OSError, match="larger /dev/shm, or lower max_bytes"):
        ShmAllReduce(name, 0, 8)
    assert not (SHM_DIR / name).exists()


def test_ranks_built_with_different_buffers_refuse_to_pair():
    name = unique_name()
    with ShmAllReduce(name, 0, 2, max_bytes=4096):
        with pytest.raises(ValueError, match="same max_bytes everywhere"):
            ShmAllReduce(name, 1, 2)


def test_the_name_is_unique_per_replica():
    name = unique_name()
    with ShmAllReduce(name, 0, 2):
        with pytest.raises(FileExistsError, match="unique"):
            ShmAllReduce(name, 0, 2)


_KEPT_MAPPED = []


def _reduce_until_aborted(rank: int, world_size: int, name: str):
    """Rank 0 reduces until the collective ends. Rank 1 stops after 50 calls and says so, keeping
    its end open: it idles, mid-run, until the parent kills it."""
    shm = ShmAllReduce(name, rank, world_size, timeout_s=60)
    tensor = torch.ones(576)
    for _ in range(50 if rank == 1 else 10 ** 9):
        try:
            shm.all_reduce_(tensor)
        except CollectiveAborted as error:
            shm.close()
            return str(error)
    _KEPT_MAPPED.append(shm)
    return "50 calls done"


def test_a_killed_peer_ends_the_survivors_calls_and_leaves_no_segment(ranks):
    """Rank 1 is SIGKILLed mid-run; rank 0, waiting for it with a 60 s timeout, sees the process gone
    (it is not even reaped yet) and raises within a fraction of a second."""
    name = unique_name()
    ranks.start(_reduce_until_aborted, 2, name)
    assert ranks.result(1) == "50 calls done"
    time.sleep(0.2)  # rank 0 is well into waiting for call 51
    os.kill(ranks.processes(2)[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    message = ranks.result(0)
    assert time.monotonic() - killed_at < 2
    assert "rank 1's process died" in message
    assert not (SHM_DIR / name).exists()
