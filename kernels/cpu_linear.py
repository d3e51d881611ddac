"""Linear layers with weights prepacked for oneDNN: the fast fp32/bf16 CPU matmul.

A plain `F.linear` repacks its weight into the GEMM's blocked layout on every call; at decode
batch sizes (8-64 rows) that repacking costs as much as the multiply. Packing once at load time
makes those matmuls 1.2-1.6x faster on this project's 2-core reference machine. A few rows
(batch-1 decode) make a matrix-vector product, bound by streaming the weight from memory, where
which path wins depends on the CPU: MKL's gemv on the plain weight beat oneDNN on one Intel
machine and lost by 1.7-2.5x on an AMD EPYC (MKL does not pick its fast code there), and our own
kernel (kernels/csrc/weight_only_linear_cpu.cpp, float32 with prefetching ahead) beats both on
that EPYC (batch-1 decode of SmolLM2 1.23x the packed path's, median of 4 paired runs).
`prepack_linears` therefore times one pass over the model's own layers every way and routes rows
below `fewest_packed_rows` to the fastest: the price is a second copy of every linear weight in
memory.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_ops import native_ops

PACKED_FOR_ROWS = 128  # oneDNN's layout hint; measured equally fast from 8 to 512 rows
FEWEST_PACKED_ROWS = 4  # below this a few-rows path, unless the packed weight wins at one row
FEW_ROWS_PATHS = ("plain", "streamed", "packed")  # MKL's gemv, our kernel, oneDNN's packed GEMM


def can_prepack(dtype: torch.dtype) -> bool:
    return (torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PrepackedLinear(nn.Module):
    """Same parameters and outputs as the nn.Linear it wraps (to float rounding), faster on CPU.
    Inference only: the packed path has no autograd."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACKED_FOR_ROWS),
                             persistent=False)
        self.route_few_rows("plain")

    def route_few_rows(self, path: str, fewest_packed_rows: int | None = None) -> None:
        """Send products of fewer than `fewest_packed_rows` rows (default: 1 for "packed", which
        then takes every row count, else FEWEST_PACKED_ROWS) down `path`, one of FEW_ROWS_PATHS."""
        if path not in FEW_ROWS_PATHS:
            raise ValueError(f"few-rows path {path!r}: choose one of {', '.join(FEW_ROWS_PATHS)}")
        self.few_rows_path = path
        self.fewest_packed_rows = fewest_packed_rows or (1 if path == "packed" else FEWEST_PACKED_ROWS)
        self._few_rows_forward = getattr(self, f"{path}_forward")  # looked up once, not per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows >= self.fewest_packed_rows:
            return self.packed_forward(x)
        return self._few_rows_forward(x)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def can_stream(self) -> bool:
        """Our kernel applies: float32, and rows a whole number of 16-float vectors."""
        return self.weight.dtype == torch.float32 and self.in_features % 16 == 0 and native_ops() is not None

    def streamed_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        out = native_ops().float32_linear(x.reshape(rows, x.shape[-1]).contiguous(), self.weight.detach())
        if self.bias is not None:
            out += self.bias.detach()
        return out.view(*x.shape[:-1], self.out_features)


def _one_pass_seconds(layers: list[PrepackedLinear], inputs: dict[int, torch.Tensor], path: str) -> float:
    """Best of three passes of one row through every layer: the weights stream from memory, as in decode."""
    best = float("inf")
    for _ in range(4):  # the first pass warms up
        start = time.perf_counter()
        for layer in layers:
            getattr(layer, f"{path}_forward")(inputs[layer.in_features])
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def choose_single_row_path(layers: list[PrepackedLinear]) -> str:
    """Route every layer's few-rows products to the path that carries one row through all of them
    fastest here (threshold 1, all packed, if that is oneDNN's); returns the path chosen."""
    if not layers:
        return "plain"
    dtype = layers[0].weight.dtype
    inputs = {n: torch.randn(1, n, dtype=dtype) for n in {layer.in_features for layer in layers}}
    paths = [p for p in FEW_ROWS_PATHS if p != "streamed" or all(layer.can_stream() for layer in layers)]
    fastest = min(paths, key=lambda path: _one_pass_seconds(layers, inputs, path))
    for layer in layers:
        layer.route_few_rows(fastest)
    return fastest


def prepack_linears(model: nn.Module, measure_single_row: bool = True) -> int:
    """Swap every CPU nn.Linear of `model` for a PrepackedLinear, in place, and (by default) time
    which path a single row should take here; returns how many were swapped."""
    swapped = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and can_prepack(child.weight.dtype):
                setattr(module, name, PrepackedLinear(child))
                swapped.append(getattr(module, name))
    if measure_single_row:
        choose_single_row_path(swapped)
    return len(swapped)
