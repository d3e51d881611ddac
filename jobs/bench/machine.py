"""This machine's limits, measured in the same run as the benchmark they put in context."""
from __future__ import annotations

import time

import torch


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """fp32 matrix-multiply throughput, what the cores can compute at best: the faster of torch's
    plain matmul and oneDNN's with a prepacked weight (on some CPUs, e.g. AMD EPYC, the plain path
    reaches half of what oneDNN does)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = _best_seconds(lambda: a @ b, repeats)
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b, size)
        seconds = min(seconds, _best_seconds(
            lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), repeats))
    return 2 * size**3 / seconds / 1e9


def weight_streaming_gbps(num_floats: int = 64 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a matrix-vector product over a matrix far larger than cache, batch-1 decode's
    limit: the faster of torch's plain product and oneDNN's over the prepacked matrix."""
    rows = 4096
    matrix = torch.randn(rows, num_floats // rows)
    vector = torch.randn(num_floats // rows)
    seconds = _best_seconds(lambda: matrix @ vector, repeats)
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(matrix, 1)
        row = vector[None]
        seconds = min(seconds, _best_seconds(
            lambda: torch.ops.mkldnn._linear_pointwise(row, packed, None, "none", [], ""), repeats))
    return matrix.numel() * 4 / seconds / 1e9


def isa() -> str:
    """The CPU and the widest vector extension our C++ kernels can use on it (they build -march=native)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    widest = "AVX-512 (VNNI, BF16)" if {"avx512f", "avx512_vnni", "avx512_bf16"} <= flags else \
        "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {widest}"
