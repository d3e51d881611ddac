"""GPTQ (Frantar et al., 2022): quantize a layer's weight one input column at a time, spreading each
column's rounding error over the columns not yet quantized so the layer's outputs on calibration
inputs X move as little as possible (second-order, through the Hessian H = X^T X / tokens).

    for each column j (in processing order):
        q_j   = round(w_j)                          with the column's fixed scale
        e_j   = (w_j - q_j) / U_jj                  U: upper Cholesky factor of H^-1
        w_k  -= e_j * U_jk    for every later column k

Columns go in blocks whose updates to later blocks are applied at once (one matmul per block).
With act_order the columns with the largest Hessian diagonal (the most active inputs) go first.

Scales are fixed up front, per contiguous group of the original columns (static groups): our int4/
int8 layers keep one scale per contiguous group and no column index map, and with act_order the
columns of one group are reached at scattered times, so a scale chosen when a group's first column
comes up would see some of its columns already updated and others not.

With keep_zeros the weights that are exactly zero when GPTQ starts (pruned by an earlier step) stay
zero, as SparseGPT keeps its mask (Frantar & Alistarh, 2023): a pruned weight's code is forced to the
code of zero whatever the updates made of it, and its error is spread like any other column's, so
the kept weights compensate for it.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from jobs.compress.calibration import InputStats
from jobs.compress.weight_only import LAYERS, WeightOnlyBits
from kernels.quant import QTensor, QuantSpec, scales_and_zeros


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian, in float64 for stability."""
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _column_scales(scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec, columns: int):
    """Per original column: its rows' scale and zero point ([rows, columns] views)."""
    if spec.granularity == "group":
        index = torch.arange(columns) // spec.group_size
    else:
        index = torch.zeros(columns, dtype=torch.long)
    rows = scale.shape[0]
    col_scale = scale[:, index].expand(-1 if rows > 1 else 1, columns)
    col_zero = None if zero is None else zero[:, index].float()
    return col_scale, col_zero


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, act_order: bool = True,
                  damp: float = 0.01, block_size: int = 128, keep_zeros: bool = False) -> QTensor:
    """Codes and scales for `weight` [out, in] given the Hessian of its inputs [in, in]; with
    `keep_zeros` every weight that is exactly zero dequantizes to exactly zero."""
    w = weight.detach().float().clone()
    pruned = w == 0 if keep_zeros else None
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0  # inputs never active: any value works, zero is exact
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = scales_and_zeros(w, spec)
    col_scale, col_zero = _column_scales(scale, zero, spec, w.shape[1])
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    col_scale, col_zero = col_scale[:, order], None if col_zero is None else col_zero[:, order]
    pruned = None if pruned is None else pruned[:, order]
    factor = _inverse_hessian_factor(h, damp).float()
    codes = torch.empty_like(w)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        errors = _quantize_block(w, codes, factor, col_scale, col_zero, pruned, spec, start, end)
        w[:, end:] -= errors @ factor[start:end, end:]
    codes = codes[:, torch.argsort(order)].to(torch.int8 if spec.symmetric else torch.uint8)
    return QTensor(codes, scale, zero, spec)


def _quantize_block(w, codes, factor, col_scale, col_zero, pruned, spec: QuantSpec, start: int,
                    end: int) -> torch.Tensor:
    """Quantize columns start..end-1 in place, updating the rest of the block; returns the scaled
    errors, for the caller to carry to the later blocks. `pruned`: where the code must stay zero."""
    errors = torch.empty(w.shape[0], end - start)
    for j in range(start, end):
        column, s = w[:, j], col_scale[:, j]
        z = 0 if col_zero is None else col_zero[:, j]
        q = torch.round(column / s + z).clamp_(spec.qmin, spec.qmax)
        if pruned is not None:
            # The code that dequantizes to exactly 0 (z: 0 when symmetric). The updates from earlier
            # columns moved this weight away from 0; its error goes to the kept weights instead.
            q = torch.where(pruned[:, j], z, q)
        codes[:, j] = q
        error = (column - (q - z) * s) / factor[j, j]
        w[:, j + 1 : end] -= error[:, None] * factor[j, j + 1 : end][None, :]
        errors[:, j - start] = error
    return errors


class GPTQConfig(WeightOnlyBits):
    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(True, description="quantize the most active inputs first")
    damp: float = Field(0.01, gt=0, lt=1, description="added to the Hessian's diagonal, times its mean")
    block_size: int = Field(128, ge=1, description="columns whose updates to later columns are batched")
    keep_zeros: bool = Field(False, description="weights already zero (pruned by an earlier step) stay zero")

    STATS = frozenset({"hessian"})

    def compress_layer(self, name: str, linear: nn.Linear, stats: InputStats | None) -> nn.Module:
        spec = QuantSpec(self.bits, True, "group" if self.group_size else "channel", self.group_size)
        q = gptq_quantize(linear.weight, stats.hessian, spec, self.act_order, self.damp, self.block_size,
                          self.keep_zeros)
        return LAYERS[self.bits].from_qtensor(q, linear.bias)
