"""How many bytes a model's linear layers take as stored: the weights a decode step reads."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from kernels.compressed import CompressedLinear


def dense_bytes(layer: nn.Module) -> int:
    """The layer's bytes as a float32 nn.Linear."""
    return 4 * (layer.in_features * layer.out_features + (0 if layer.bias is None else layer.out_features))


def linear_bytes(model: nn.Module) -> int:
    """Every linear layer as stored: compressed ones by their buffers, plain ones at their dtype. A tied
    head counts although the embedding holds its weight: every decode step reads it."""
    total = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            total += module.num_bytes()
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def compressed_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the compressed linears as stored, their bytes as float32 nn.Linear)."""
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    return sum(m.num_bytes() for m in layers), sum(dense_bytes(m) for m in layers)


def checkpoint_bytes(folder: Path) -> int:
    """The bytes of a checkpoint's weight files."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
