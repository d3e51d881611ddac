"""Weight-only int8 linear: int8 codes with one float scale per output row or per group of inputs.

At decode batch sizes (a few rows) a linear layer is bound by reading its weight; the C++ kernel
(kernels/csrc/int8_linear_cpu.cpp) reads the int8 codes, a quarter of fp32's bytes, and widens
them in registers (2.2-5x faster than fp32 F.linear at 1-4 rows on the reference machine). Larger
batches (prefill) are compute-bound and take the torch reference: dequantize, then F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_ops import native_ops
from kernels.quant import QTensor, QuantSpec, dequantize, quantize

NATIVE_MAX_ROWS = 16  # beyond this the weight is reused enough for the fp32 GEMM to win


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (codes * scale)^T + bias, symmetric int8 codes [out, in], scale [out, groups]."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"codes must be 2-D int8, got {codes.dtype} {tuple(codes.shape)}")
        if scale.dim() != 2 or scale.shape[0] != codes.shape[0] or codes.shape[1] % scale.shape[1]:
            raise ValueError(f"scale {tuple(scale.shape)} does not fit codes {tuple(codes.shape)}")
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> Int8WeightOnlyLinear:
        """Round-to-nearest symmetric int8, per output channel or per group of `group_size` inputs."""
        spec = QuantSpec(8, True, "group" if group_size else "channel", group_size)
        q = quantize(linear.weight, spec)
        return cls(q.codes, q.scale, linear.bias)

    def qtensor(self) -> QTensor:
        groups = self.scale.shape[1]
        spec = QuantSpec(8, True, "group", self.in_features // groups) if groups > 1 else QuantSpec(8, True)
        return QTensor(self.codes, self.scale, None, spec)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.qtensor(), x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        ops = native_ops() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if ops is None or rows > NATIVE_MAX_ROWS or (torch.is_grad_enabled() and x.requires_grad):
            return self.reference(x)
        out = ops.int8_linear(x.reshape(rows, self.in_features), self.codes, self.scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.scale.shape[1]}"
