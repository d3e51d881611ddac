"""Low-rank linear: W ~ up @ down with up [out, rank] and down [rank, in], from a truncated SVD.

Two thin matmuls read rank * (in + out) weights instead of in * out: smaller and faster whenever
rank < in * out / (in + out).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.compressed import CompressedLinear


class LowRankLinear(CompressedLinear):
    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"need up [out, rank] and down [rank, in], got {tuple(up.shape)} and {tuple(down.shape)}")
        self.out_features, self.rank = up.shape
        self.in_features = down.shape[1]
        self.register_buffer("up", up.float().contiguous())
        self.register_buffer("down", down.float().contiguous())
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-`rank` approximation (Eckart-Young), singular values split evenly by square root."""
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        return cls(u[:, :rank] * root, root[:, None] * vh[:rank], linear.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x @ self.down.to(x.dtype).T) @ self.up.to(x.dtype).T
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
