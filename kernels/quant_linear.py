"""Weight-only quantized linears: int8 codes, or signed int4/int3/int2 codes packed along each row,
with one float scale per output row or per group of inputs (symmetric, round-to-nearest by default).

At decode batch sizes a linear layer is bound by reading its weight; for int8 and int4 the C++
kernel (kernels/csrc/weight_only_linear_cpu.cpp) reads the codes — a quarter (int8) or an eighth
(int4) of fp32's bytes — and widens them in registers, and on CUDA the Triton kernel does the same.
Prefill chunks (hundreds of rows) are compute-bound and take the torch reference: dequantize, then
F.linear. Int3 and int2 have no kernel of their own (native_op None): they are storage formats
that always take the torch reference.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from kernels.compressed import CompressedLinear
from kernels.cpu_ops import native_ops
from kernels.quant import (QTensor, QuantSpec, dequantize, pack_int2, pack_int3, pack_int4, quantize, unpack_int2,
                           unpack_int3, unpack_int4)

# Up to this many rows the C++ kernel beats dequantizing the whole weight for a GEMM (measured on
# the 2-core reference machine: at 64 rows 0.6 ms against 0.8 ms for 576x1536, 22 ms against 81 ms for
# the 576x49152 head); prefill chunks, hundreds of rows, amortize the dequantization instead.
NATIVE_MAX_ROWS = 64


class WeightOnlyLinear(CompressedLinear):
    """y = x @ (codes * scale)^T + bias; `codes` as the subclass stores them, scale [out, groups]."""

    ROW_BUFFERS = ("codes", "scale")  # packing stays within a row, so packed rows concatenate too
    bits: ClassVar[int]
    codes_dtype: ClassVar[torch.dtype]
    # `codes_per_pack` codes are stored in `bytes_per_pack` bytes of a row: in_features must be a
    # multiple of codes_per_pack.
    codes_per_pack: ClassVar[int] = 1
    bytes_per_pack: ClassVar[int] = 1
    # The C++ op (and Triton kernel) for these codes; None: there is none, the torch reference runs.
    native_op: ClassVar[str | None]

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if codes.dtype != self.codes_dtype or codes.dim() != 2:
            raise ValueError(f"{type(self).__name__} codes must be 2-D {self.codes_dtype}, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        self.out_features, self.in_features = codes.shape[0], self._in_features(codes)
        if scale.dim() != 2 or scale.shape[0] != self.out_features or self.in_features % scale.shape[1]:
            raise ValueError(f"scale {tuple(scale.shape)} does not fit codes {tuple(codes.shape)}")
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self._set_bias(bias)

    @classmethod
    def weight_spec(cls, group_size: int | None = None) -> QuantSpec:
        return QuantSpec(cls.bits, True, "group" if group_size else "channel", group_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> WeightOnlyLinear:
        """Round-to-nearest symmetric codes, per output channel or per group of `group_size` inputs."""
        q = quantize(linear.weight, cls.weight_spec(group_size))
        return cls.from_qtensor(q, linear.bias)

    @classmethod
    def from_qtensor(cls, q: QTensor, bias: torch.Tensor | None = None) -> WeightOnlyLinear:
        """The layer holding codes and scales some algorithm (GPTQ, AWQ, ...) has chosen."""
        if q.zero is not None or q.spec.bits != cls.bits or q.spec.granularity == "tensor":
            raise ValueError(f"{cls.__name__} takes symmetric {cls.bits}-bit codes per channel or group")
        return cls(cls.pack(q.codes), q.scale, bias)

    @staticmethod
    def pack(codes: torch.Tensor) -> torch.Tensor:
        """The stored form of int8 codes [out, in]: as they are, unless a subclass packs them."""
        return codes

    @staticmethod
    def unpack(stored: torch.Tensor) -> torch.Tensor:
        """Inverse of pack: int8 codes [out, in]."""
        return stored

    def _in_features(self, codes: torch.Tensor) -> int:
        if codes.shape[1] % self.bytes_per_pack:
            raise ValueError(f"{type(self).__name__} codes hold {self.bytes_per_pack} bytes per "
                             f"{self.codes_per_pack} inputs; a row of {codes.shape[1]} bytes does not fit")
        return codes.shape[1] // self.bytes_per_pack * self.codes_per_pack

    def qtensor(self) -> QTensor:
        groups = self.scale.shape[1]
        spec = QuantSpec(self.bits, True, "group", self.in_features // groups) if groups > 1 \
            else QuantSpec(self.bits, True)
        return QTensor(self.unpack(self.codes), self.scale, None, spec)

    def dense_weight(self) -> torch.Tensor:
        return dequantize(self.qtensor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_op is None or (torch.is_grad_enabled() and x.requires_grad):
            return self.reference(x)
        rows = x.numel() // self.in_features
        if x.is_cuda:
            from kernels.triton_quant_linear import weight_only_linear_triton  # Triton only where it runs

            out = weight_only_linear_triton(x.reshape(rows, self.in_features), self.codes, self.scale, self.bias,
                                            self.bits)
            return out.view(*x.shape[:-1], self.out_features)
        ops = native_ops() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if ops is None or rows > NATIVE_MAX_ROWS:
            return self.reference(x)
        out = getattr(ops, self.native_op)(x.reshape(rows, self.in_features), self.codes, self.scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups={self.scale.shape[1]}")


class Int8WeightOnlyLinear(WeightOnlyLinear):
    """codes: int8 [out, in]."""

    bits, codes_dtype, native_op = 8, torch.int8, "int8_linear"


class Int4WeightOnlyLinear(WeightOnlyLinear):
    """codes: signed 4-bit, packed two per byte, uint8 [out, in / 2]."""

    bits, codes_dtype, native_op = 4, torch.uint8, "int4_linear"
    codes_per_pack, bytes_per_pack = 2, 1
    pack, unpack = staticmethod(pack_int4), staticmethod(unpack_int4)


class Int3WeightOnlyLinear(WeightOnlyLinear):
    """codes: signed 3-bit, eight packed in three bytes, uint8 [out, in * 3 / 8]; in % 8 == 0."""

    bits, codes_dtype, native_op = 3, torch.uint8, None
    codes_per_pack, bytes_per_pack = 8, 3
    pack, unpack = staticmethod(pack_int3), staticmethod(unpack_int3)


class Int2WeightOnlyLinear(WeightOnlyLinear):
    """codes: signed 2-bit, packed four per byte, uint8 [out, in / 4]."""

    bits, codes_dtype, native_op = 2, torch.uint8, None
    codes_per_pack, bytes_per_pack = 4, 1
    pack, unpack = staticmethod(pack_int2), staticmethod(unpack_int2)
