"""Linear layers with weights prepacked for oneDNN: the fast fp32/bf16 CPU matmul.

A plain `F.linear` repacks its weight into the GEMM's blocked layout on every call; at decode
batch sizes (8-64 rows) that repacking costs as much as the multiply. Packing once at load time
makes those matmuls 1.2-1.6x faster on this project's 2-core reference machine. A single row
(batch-1 decode) is a matrix-vector product that oneDNN handles worse than MKL's gemv, so those
calls keep the plain weight: the price is a second copy of every linear weight in memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_FOR_ROWS = 128  # oneDNN's layout hint; measured equally fast from 8 to 512 rows
FEWEST_PACKED_ROWS = 4  # below this, MKL's gemv on the plain weight wins


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < FEWEST_PACKED_ROWS:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def prepack_linears(model: nn.Module) -> int:
    """Swap every CPU nn.Linear of `model` for a PrepackedLinear, in place; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and can_prepack(child.weight.dtype):
                setattr(module, name, PrepackedLinear(child))
                swapped += 1
    return swapped
