"""Sparse linears: store only the weights pruning kept.

- SparseLinear ("sparse"): any pattern. A bitmask of kept positions (one bit per weight, packed
  eight per byte along each row) and the kept values in row-major order: at 50% sparsity about
  0.53x of the dense bytes.
- SemiStructuredLinear ("sparse_2of4"): at most two nonzeros in every four consecutive inputs (the
  layout sparse tensor cores run). The two kept values of each group and their 2-bit positions
  (one group per nibble): 0.5625x of the dense bytes.

On CPU no kernel gains time from 50% sparsity at these sizes, so compute runs the dense matmul on a
weight decompressed once, at first use, and kept beside the compressed form (not saved): the formats
save bytes on disk and in transit, not compute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.compressed import CompressedLinear

BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)  # bit i of a byte holds position 8 * byte + i


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols / 8)] uint8, position j at bit j % 8 of byte j // 8."""
    rows, cols = mask.shape
    padded = F.pad(mask.to(torch.int32), (0, -cols % 8)).view(rows, -1, 8)
    return (padded * BIT_WEIGHTS).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    bits = (packed.to(torch.int32)[..., None] & BIT_WEIGHTS) != 0
    return bits.view(packed.shape[0], -1)[:, :cols]


class _DecompressedOnce(CompressedLinear):
    """Compute through a dense weight rebuilt at first use (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.__dict__.get("_dense")
        if dense is None or dense.device != x.device or dense.dtype != x.dtype:
            dense = self.__dict__["_dense"] = self.dense_weight().to(x.device, x.dtype)
        return F.linear(x, dense, None if self.bias is None else self.bias.to(x.dtype))


class SparseLinear(_DecompressedOnce):
    ROW_BUFFERS = ("mask", "values")  # values: the kept weights row after row

    def __init__(self, mask: torch.Tensor, values: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        if mask.dtype != torch.uint8 or mask.dim() != 2 or mask.shape[1] != -(-in_features // 8):
            raise ValueError(f"mask must be uint8 [out, ceil(in / 8)], got {mask.dtype} {tuple(mask.shape)}")
        kept = int(unpack_bits(mask, in_features).sum())
        if values.dim() != 1 or values.numel() != kept:
            raise ValueError(f"values must list the {kept} kept weights, got {tuple(values.shape)}")
        self.out_features, self.in_features = mask.shape[0], in_features
        self.register_buffer("mask", mask.contiguous())
        self.register_buffer("values", values.float().contiguous())
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        weight = linear.weight.detach().float()
        kept = weight != 0
        return cls(pack_bits(kept), weight[kept], linear.in_features, linear.bias)

    def format_args(self) -> dict:
        return {"in_features": self.in_features}

    def dense_weight(self) -> torch.Tensor:
        weight = torch.zeros(self.out_features, self.in_features, device=self.values.device)
        weight[unpack_bits(self.mask, self.in_features)] = self.values
        return weight


class SemiStructuredLinear(_DecompressedOnce):
    ROW_BUFFERS = ("values", "positions")

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if values.dim() != 2 or positions.dtype != torch.uint8 or positions.shape != (values.shape[0],
                                                                                        values.shape[1] // 4):
            raise ValueError(f"need values [out, in / 2] and uint8 positions [out, in / 8], got "
                             f"{tuple(values.shape)} and {positions.dtype} {tuple(positions.shape)}")
        self.out_features, self.in_features = values.shape[0], values.shape[1] * 2
        self.register_buffer("values", values.float().contiguous())
        self.register_buffer("positions", positions.contiguous())
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SemiStructuredLinear:
        weight = linear.weight.detach().float()
        if weight.shape[1] % 8:
            raise ValueError(f"2:4 storage needs inputs in multiples of 8, got {weight.shape[1]}")
        groups = weight.view(weight.shape[0], -1, 4)
        if ((groups != 0).sum(-1) > 2).any():
            raise ValueError("the weight is not 2:4 sparse: some group of four inputs has more than two nonzeros")
        # The two kept positions of a group: its nonzeros first, then zeros to fill, in input order.
        keep = torch.sort(torch.topk((groups != 0).to(torch.int8) * 4 - torch.arange(4), 2, dim=-1).indices,
                          dim=-1).values
        values = groups.gather(-1, keep).reshape(weight.shape[0], -1)
        nibbles = (keep[..., 0] | (keep[..., 1] << 2)).to(torch.uint8)  # [out, in / 4]
        positions = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return cls(values, positions, linear.bias)

    def dense_weight(self) -> torch.Tensor:
        nibbles = torch.stack([self.positions & 0xF, self.positions >> 4], -1).view(self.out_features, -1)
        keep = torch.stack([nibbles & 0x3, (nibbles >> 2) & 0x3], -1).long()  # [out, in / 4, 2]
        groups = torch.zeros(self.out_features, self.in_features // 4, 4, device=self.values.device)
        groups.scatter_(-1, keep, self.values.view(self.out_features, -1, 2))
        return groups.view(self.out_features, self.in_features)
