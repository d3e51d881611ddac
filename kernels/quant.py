"""Integer quantization of weights: the math every compressed layer and algorithm builds on.

A QuantSpec says how: bits (2..8), symmetric or not, and the granularity — one scale per tensor,
per output channel (row), or per group of `group_size` consecutive inputs within a row.
`quantize` returns a QTensor (integer codes, scales, zero points); `dequantize` inverts it up to
rounding; `fake_quantize` does both in one differentiable step (straight-through estimator), so
quantization-aware training sees the rounding in its forward pass and passes gradients through.

Codes are one byte whatever the bit width: int8 for symmetric, uint8 (offset by the zero point)
for asymmetric. For storage (and the int4 kernels) narrower codes are packed along the row:
`pack_int4` two per byte, `pack_int2` four per byte, `pack_int3` eight in three bytes.
`log_quantize` is the logarithmic activation code of the design's seed articles (finer steps near
the minimum); a storage/fake-quant code, not one integer matmuls take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None  # with granularity "group"

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("group_size is given exactly when granularity is 'group'")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass
class QTensor:
    codes: torch.Tensor  # the weight's shape; int8 (symmetric) or uint8 (asymmetric)
    scale: torch.Tensor  # float32, [rows, groups per row] (tensor: [1, 1]; channel: [rows, 1])
    zero: torch.Tensor | None  # int32 like scale; None when symmetric
    spec: QuantSpec


def _grouped(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View the 2-D weight as [rows or 1, groups, group length] for the spec's granularity."""
    if weight.dim() != 2:
        raise ValueError(f"weights to quantize must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if spec.granularity == "tensor":
        return weight.reshape(1, 1, rows * cols)
    if spec.granularity == "channel":
        return weight.reshape(rows, 1, cols)
    if cols % spec.group_size:
        raise ValueError(f"group_size {spec.group_size} does not divide the input dimension {cols}")
    return weight.reshape(rows, cols // spec.group_size, spec.group_size)


def scales_and_zeros(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest ranges: symmetric maps max|w| to qmax; asymmetric maps [min, max] to [0, qmax]."""
    groups = _grouped(weight.detach().float(), spec)
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        scale = groups.abs().amax(-1) / spec.qmax
        return scale.clamp_min(tiny), None
    low = groups.amin(-1).clamp_max(0)
    high = groups.amax(-1).clamp_min(0)
    scale = ((high - low) / spec.qmax).clamp_min(tiny)
    zero = torch.round(-low / scale).clamp(0, spec.qmax).to(torch.int32)
    return scale, zero


def quantize(weight: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
             zero: torch.Tensor | None = None) -> QTensor:
    """Round each weight to its code; scale/zero default to the round-to-nearest ranges."""
    if scale is None:
        scale, zero = scales_and_zeros(weight, spec)
    groups = _grouped(weight.detach().float(), spec)
    shifted = groups / scale.unsqueeze(-1) + (0 if zero is None else zero.unsqueeze(-1))
    codes = torch.round(shifted).clamp(spec.qmin, spec.qmax).to(torch.int8 if spec.symmetric else torch.uint8)
    return QTensor(codes.reshape(weight.shape), scale, zero, spec)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    groups = _grouped(q.codes.to(torch.float32), q.spec)
    if q.zero is not None:
        groups = groups - q.zero.unsqueeze(-1)
    return (groups * q.scale.unsqueeze(-1)).reshape(q.codes.shape).to(dtype)


class _RoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return dequantize(quantize(weight, spec), weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # straight through: rounding treated as the identity


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize then dequantize, with the straight-through estimator as its gradient."""
    return _RoundTrip.apply(weight, spec)


def _check_row_length(tensor: torch.Tensor, multiple: int, what: str) -> None:
    if tensor.shape[-1] % multiple:
        raise ValueError(f"{what} needs a last dimension divisible by {multiple}, got {tensor.shape[-1]}")


def _sign_extend(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-wide fields as int8 two's-complement values."""
    fields = fields.to(torch.int8)
    return torch.where(fields >= 2 ** (bits - 1), fields - 2**bits, fields)


def _pack_fields(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """8 // bits codes per byte along the last dimension, the first in the lowest bits."""
    per_byte = 8 // bits
    _check_row_length(codes, per_byte, f"int{bits} packing")
    fields = (codes.to(torch.uint8) & (2**bits - 1)).reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros(fields.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        packed |= fields[..., i] << (bits * i)
    return packed


def _unpack_fields(packed: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    fields = (packed[..., None] >> shifts) & (2**bits - 1)
    fields = fields.reshape(*packed.shape[:-1], -1)
    return _sign_extend(fields, bits) if signed else fields.to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dimension (low nibble first); codes in [-8, 15]."""
    return _pack_fields(codes, 4)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of pack_int4: int8 codes, sign-extended when `signed`."""
    return _unpack_fields(packed, 4, signed)


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """Four 2-bit codes per byte along the last dimension (the first in the lowest bits); codes in [-2, 3]."""
    return _pack_fields(codes, 2)


def unpack_int2(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of pack_int2: int8 codes, sign-extended when `signed`."""
    return _unpack_fields(packed, 2, signed)


# 3 bits do not divide a byte: eight codes fill 24 bits, stored as three little-endian bytes.
_INT3_SHIFTS = torch.arange(0, 24, 3, dtype=torch.int32)
_BYTE_SHIFTS = torch.arange(0, 24, 8, dtype=torch.int32)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """Eight 3-bit codes in three bytes along the last dimension (the first in the lowest bits of a
    little-endian 24-bit word); codes in [-4, 7]. The last dimension must be a multiple of 8."""
    _check_row_length(codes, 8, "int3 packing")
    fields = (codes.to(torch.int32) & 0x7).reshape(*codes.shape[:-1], -1, 8)
    words = (fields << _INT3_SHIFTS.to(codes.device)).sum(-1)  # fields do not overlap: sum is bitwise or
    packed = (words[..., None] >> _BYTE_SHIFTS.to(codes.device)) & 0xFF
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_int3(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of pack_int3: int8 codes, sign-extended when `signed`."""
    _check_row_length(packed, 3, "int3 unpacking")
    triples = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
    words = (triples << _BYTE_SHIFTS.to(packed.device)).sum(-1)
    fields = ((words[..., None] >> _INT3_SHIFTS.to(packed.device)) & 0x7).reshape(*packed.shape[:-1], -1)
    return _sign_extend(fields, 3) if signed else fields.to(torch.int8)


def log_quantize(a: torch.Tensor, bits: int, low: float, high: float) -> torch.Tensor:
    """Logarithmic codes in [0, 2^bits - 1] for values calibrated to [low, high]:
    round(log(a - low + 1) / log(high - low + 1) * (2^bits - 1)). Steps are fine near `low` and
    coarse near `high`, for activations that crowd near their minimum with a long tail."""
    if high <= low:
        raise ValueError(f"need high > low, got [{low}, {high}]")
    levels = 2**bits - 1
    shifted = torch.log1p(a.float().clamp(low, high) - low) / math.log1p(high - low)
    return torch.round(shifted * levels).to(torch.int32)


def log_dequantize(codes: torch.Tensor, bits: int, low: float, high: float) -> torch.Tensor:
    """Inverse of log_quantize (up to its rounding)."""
    return torch.expm1(codes.float() / (2**bits - 1) * math.log1p(high - low)) + low
