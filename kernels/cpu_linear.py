"""Linear layers with weights prepacked for oneDNN: the fast fp32/bf16 CPU matmul.

A plain `F.linear` repacks its weight into the GEMM's blocked layout on every call; at decode
batch sizes (8-64 rows) that repacking costs as much as the multiply. Packing once at load time
makes those matmuls 1.2-1.6x faster on this project's 2-core reference machine. A single row
(batch-1 decode) is a matrix-vector product, where which path wins depends on the CPU: MKL's gemv
on the plain weight beat oneDNN on one Intel machine, and lost by 1.7-2.5x on an AMD EPYC (MKL does
not pick its fast code there). `prepack_linears` therefore times one pass over the model's own
layers both ways and routes rows below `fewest_packed_rows` to the plain weight: the price is a
second copy of every linear weight in memory.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

PACKED_FOR_ROWS = 128  # oneDNN's layout hint; measured equally fast from 8 to 512 rows
FEWEST_PACKED_ROWS = 4  # below this the plain weight's gemv, unless measured otherwise


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
        self.fewest_packed_rows = FEWEST_PACKED_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < self.fewest_packed_rows:
            return F.linear(x, self.weight, self.bias)
        return self.packed_forward(x)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _one_pass_seconds(layers: list[PrepackedLinear], inputs: dict[int, torch.Tensor], packed: bool) -> float:
    """Best of three passes of one row through every layer: the weights stream from memory, as in decode."""
    best = float("inf")
    for _ in range(4):  # the first pass warms up
        start = time.perf_counter()
        for layer in layers:
            (layer.packed_forward if packed else layer.plain_forward)(inputs[layer.in_features])
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def choose_single_row_path(layers: list[PrepackedLinear]) -> int:
    """Set every layer's `fewest_packed_rows` to 1 if the packed weights carry a single row faster
    here, else leave the gemv default; returns the threshold chosen."""
    if not layers:
        return FEWEST_PACKED_ROWS
    dtype = layers[0].weight.dtype
    inputs = {n: torch.randn(1, n, dtype=dtype) for n in {layer.in_features for layer in layers}}
    packed_wins = _one_pass_seconds(layers, inputs, packed=True) < _one_pass_seconds(layers, inputs, packed=False)
    threshold = 1 if packed_wins else FEWEST_PACKED_ROWS
    for layer in layers:
        layer.fewest_packed_rows = threshold
    return threshold


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
