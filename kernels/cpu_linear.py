"""Linear layers with weights prepacked once at load: the fast fp32/bf16 CPU matmul.

A plain `F.linear` repacks its weight into the GEMM's blocked layout on every call; at decode
batch sizes (8-64 rows) that repacking costs as much as the multiply. Packing once at load time
removes it. Two packed layouts:
- "panels", float32 where our C++ kernels are built: our own GEMM (kernels/csrc/float32_gemm_cpu.cpp)
  over panels of 16 output features, which prefetches the next weights while it computes. In a
  decode step the weights come from memory, not cache, and there it beats oneDNN's packed GEMM
  1.35-1.6x at 32-64 rows and 1.5x at one row (2-core Zen 3, paired runs); at prefill sizes the
  two are even.
- "onednn", otherwise (bfloat16, or no C++ kernels): oneDNN's packed layout.
A few rows (batch-1 decode) make a matrix-vector product, bound by streaming the weight from
memory, where which path wins depends on the CPU (MKL's gemv beat oneDNN on one Intel machine and
lost 1.7-2.5x on an AMD EPYC), so `prepack_linears` times one pass over the model's own layers
both ways and routes rows below `fewest_packed_rows` to the faster. The price of prepacking is a
second copy of every linear weight in memory.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_ops import native_ops

PACKED_FOR_ROWS = 128  # oneDNN's layout hint; measured equally fast from 8 to 512 rows
FEWEST_PACKED_ROWS = 4  # below this MKL's gemv, unless the packed weight wins at one row
FEW_ROWS_PATHS = ("plain", "packed")  # MKL's gemv on the plain weight, or the packed layout
LAYOUTS = ("panels", "onednn")


def can_prepack(dtype: torch.dtype) -> bool:
    """oneDNN can pack `dtype` here: float32 wherever it runs; bfloat16 only on CPUs with bf16
    instructions (AVX-512 BF16 or AVX-NE-CONVERT; not on AVX2-only CPUs such as Zen 3)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_use_panels(linear: nn.Linear) -> bool:
    """Our panel GEMM applies: float32, inputs a whole number of 16-float vectors, kernels built."""
    return linear.weight.dtype == torch.float32 and linear.in_features % 16 == 0 and native_ops() is not None


class PrepackedLinear(nn.Module):
    """Same parameters and outputs as the nn.Linear it wraps (to float rounding), faster on CPU.
    Inference only: the packed paths have no autograd. `layout`: one of LAYOUTS (default: panels
    where they apply)."""

    def __init__(self, linear: nn.Linear, layout: str | None = None):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.layout = layout or ("panels" if can_use_panels(linear) else "onednn")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        weight = linear.weight.detach()
        if self.layout == "panels":
            self._panel_linear = native_ops().float32_panel_linear  # bound once, not looked up per call
            self._packed_product = self._panels_product
            packed = native_ops().pack_float32_panels(weight)
        else:
            self._packed_product = self._onednn_product
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_ROWS)
        self.register_buffer("packed", packed, persistent=False)
        self.route_few_rows("plain")

    def route_few_rows(self, path: str, fewest_packed_rows: int | None = None) -> None:
        """Send products of fewer than `fewest_packed_rows` rows (default FEWEST_PACKED_ROWS) down
        `path`, one of FEW_ROWS_PATHS; "packed" takes every row count, so its threshold is 1."""
        if path not in FEW_ROWS_PATHS:
            raise ValueError(f"few-rows path {path!r}: choose one of {', '.join(FEW_ROWS_PATHS)}")
        self.few_rows_path = path
        self.fewest_packed_rows = 1 if path == "packed" else fewest_packed_rows or FEWEST_PACKED_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows >= self.fewest_packed_rows:
            return self.packed_forward(x)
        return F.linear(x, self.weight, self.bias)  # MKL's gemv on the plain weight

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        out = self._packed_product(x.reshape(rows, x.shape[-1]), None if self.bias is None else self.bias.detach())
        return out.view(*x.shape[:-1], self.out_features)

    def _panels_product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self._panel_linear(x, self.packed, self.out_features, bias)

    def _onednn_product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def _one_pass_seconds(layers: list[PrepackedLinear], inputs: dict[int, torch.Tensor], path: str) -> float:
    """Best of three passes of one row through every layer, routed down `path`: the weights stream
    from memory, as in decode."""
    for layer in layers:
        layer.route_few_rows(path)
    best = float("inf")
    for _ in range(4):  # the first pass warms up
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def choose_single_row_path(layers: list[PrepackedLinear]) -> str:
    """Route every layer's few-rows products to the path that carries one row through all of them
    fastest here (threshold 1, all packed, if that is the packed layout); returns the path chosen."""
    if not layers:
        return "plain"
    dtype = layers[0].weight.dtype
    inputs = {n: torch.randn(1, n, dtype=dtype) for n in {layer.in_features for layer in layers}}
    fastest = min(FEW_ROWS_PATHS, key=lambda path: _one_pass_seconds(layers, inputs, path))
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
