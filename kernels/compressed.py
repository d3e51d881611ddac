"""The contract every compressed linear layer keeps, and fusing such layers by rows.

A compressed layer stands in for an nn.Linear: same in/out features, same outputs up to the
compression's error. Its state is a handful of named tensors (buffers, so `state_dict()` is what a
checkpoint stores) plus a few JSON-able arguments (`format_args`); `from_state(tensors, args)`
rebuilds it exactly. `reference(x)` is the torch reference every fast path is tested against;
`dense_weight()` decompresses to a plain [out, in] float32 matrix, for exporting a plain Hugging
Face folder. kernels/checkpoint.py names the formats and stores them.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class CompressedLinear(nn.Module):
    # Buffers holding one slice per output row (the bias is one too): layers of one format that
    # agree in everything else fuse by concatenating them. Empty: the format cannot fuse.
    ROW_BUFFERS: ClassVar[tuple[str, ...]] = ()
    in_features: int
    out_features: int

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        # A buffer, not a parameter: the layer is inference-only and its state is all buffers.
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def format_args(self) -> dict[str, Any]:
        """What, beside the tensors, rebuilds the layer; JSON-able."""
        return {}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], args: dict[str, Any]) -> CompressedLinear:
        """The layer whose `state_dict()` is `tensors` and whose `format_args()` is `args`."""
        return cls(**tensors, **args)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x)

    @classmethod
    def concat_rows(cls, layers: list[CompressedLinear]) -> CompressedLinear | None:
        """One layer computing the given layers' outputs side by side (for fused q/k/v, gate/up), or
        None when they cannot be one: the format cannot fuse, or the layers' arguments differ."""
        args = layers[0].format_args()
        if not cls.ROW_BUFFERS or any(layer.format_args() != args for layer in layers):
            return None
        merged = cls._concat_states([layer.state_dict() for layer in layers])
        return None if merged is None else cls.from_state(merged, args)

    @classmethod
    def _concat_states(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """Row buffers concatenated, every other buffer shared; None when the states do not fit
        together (a buffer only some have, rows of other widths, a shared buffer that differs)."""
        if any(state.keys() != states[0].keys() for state in states):
            return None
        merged = {}
        for key in states[0]:
            tensors = [state[key] for state in states]
            if key in (*cls.ROW_BUFFERS, "bias"):
                if len({t.shape[1:] for t in tensors}) > 1:
                    return None  # other inputs, or other groups of inputs
                merged[key] = torch.cat(tensors)
            elif all(torch.equal(t, tensors[0]) for t in tensors):
                merged[key] = tensors[0]
            else:
                return None
        return merged

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class StackedLinear(nn.Module):
    """Several layers with one input, their outputs concatenated: the fused q/k/v or gate/up of an
    engine model when the parts are stored in formats that cannot be fused into one layer."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def fuse_rows(parts: list[nn.Module]) -> nn.Module:
    """One module whose output is the parts' outputs side by side: a plain Linear when all are
    plain, one compressed layer when their format can fuse, a StackedLinear otherwise."""
    if all(type(p) is nn.Linear for p in parts):
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None)
        fused.weight.data = torch.cat([p.weight.data for p in parts])
        if fused.bias is not None:
            fused.bias.data = torch.cat([p.bias.data for p in parts])
        return fused
    kinds = {type(p) for p in parts}
    if len(kinds) == 1 and issubclass(kind := kinds.pop(), CompressedLinear):
        fused = kind.concat_rows(parts)
        if fused is not None:
            return fused
    return StackedLinear(parts)
