"""W8A8: int8 weights times int8 activations, accumulated in int32.

Weights: symmetric int8 codes, one float32 scale per output channel. Activations are quantized
as they arrive: per token (row) with scale max|x_row| / 127 ("dynamic", nothing to calibrate), or
with one calibrated per-tensor `input_scale` ("static"). Then

    y = (q_x @ q_w^T) * s_x * s_w + bias          (q_x @ q_w^T summed exactly in int32)

The reference does the integer sum in float64 (exact: |products| * inputs < 2^53); the fast path
is torch._int_mm (int8 GEMM with int32 accumulation), the same numbers.

A tensor-parallel shard that keeps only some input columns (kernels/shard.py) sees only part of each
token's row, so its dynamic max|x_row| is not the whole row's: `amax_reduce`, when set, combines the
shards' maxima (an all-reduce with MAX across ranks) before the scale is taken, so that every shard
quantizes with the unsharded layer's scale and the shards' outputs sum to the unsharded output.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels.compressed import CompressedLinear
from kernels.quant import QuantSpec, quantize

ACT_MAX = 127  # symmetric codes: -127..127, so dynamic scales map max|x| exactly


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None,
                         amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [rows, in], float32 scales [rows, 1]) of a 2-D activation; `amax_reduce` maps the
    dynamic per-row max|x| [rows, 1] (a fresh tensor: it may reduce in place) to the one to scale by
    (the max over a row's shards)."""
    x = x.float()
    if input_scale is None:
        amax = x.abs().amax(-1, keepdim=True)
        if amax_reduce is not None:
            amax = amax_reduce(amax)
        scale = (amax / ACT_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    codes = torch.round(x / scale).clamp_(-ACT_MAX, ACT_MAX).to(torch.int8)
    return codes, scale


def _int_mm_works(x: torch.Tensor) -> bool:
    return hasattr(torch, "_int_mm") and x.device.type in ("cpu", "cuda")


class W8A8Linear(CompressedLinear):
    ROW_BUFFERS = ("codes", "scale")  # input_scale, when there is one, is shared
    WEIGHT_SPEC = QuantSpec(8, True, "channel")  # one symmetric scale per output row

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or scale.shape != (codes.shape[0], 1):
            raise ValueError(f"need int8 codes [out, in] and scales [out, 1], got {codes.dtype} "
                             f"{tuple(codes.shape)} and {tuple(scale.shape)}")
        if input_scale is not None and (input_scale.numel() != 1 or not input_scale.item() > 0):
            raise ValueError("input_scale must be one positive number")
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        self._set_bias(bias)
        # Set by a tensor-parallel engine on input-column shards (see the module docstring); a plain
        # attribute, so neither state_dict nor format_args carries it.
        self.amax_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_scale: torch.Tensor | None = None) -> W8A8Linear:
        q = quantize(linear.weight, cls.WEIGHT_SPEC)
        return cls(q.codes, q.scale, linear.bias, input_scale)

    def dense_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scale

    def _finish(self, acc: torch.Tensor, x_scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        out = acc.float() * x_scale * self.scale.T
        if self.bias is not None:
            out += self.bias
        return out.to(dtype).view(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        codes, x_scale = quantize_activations(x.reshape(-1, self.in_features), self.input_scale, self.amax_reduce)
        acc = codes.double() @ self.codes.double().T
        return self._finish(acc, x_scale, x.shape, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _int_mm_works(x):
            return self.reference(x)
        codes, x_scale = quantize_activations(x.reshape(-1, self.in_features), self.input_scale, self.amax_reduce)
        return self._finish(torch._int_mm(codes, self.codes.T), x_scale, x.shape, x.dtype)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.input_scale is None else f"static {self.input_scale.item():.3g}"
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={mode}"
