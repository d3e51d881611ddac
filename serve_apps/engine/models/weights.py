"""A checkpoint's weights into one of our models, plain tensors and compressed layers alike.

Our models compute as one matmul some projections Hugging Face stores apart (FUSED_PROJECTIONS):
q/k/v as `qkv_proj`, gate/up as `gate_up_proj`, each part a slot of rows (`fused_linear`). A plain
tensor is copied into its slot as it arrives. A compressed layer for a slot waits until the whole
checkpoint is read; then the fused module is rebuilt from its parts (kernels.compressed.fuse_rows):
one compressed layer where the format can concatenate rows (int8/int4 weight-only with one group
size), the parts side by side otherwise (StackedLinear).

Under tensor parallelism a rank reads only its share of each projection (PARALLEL_PROJECTIONS says
how each splits); the fused slots are then that rank's sizes.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.checkpoint import Split
from kernels.compressed import fuse_rows
from kernels.shard import COLUMN, ROW

# Hugging Face's projection -> (our fused module beside it, slot)
FUSED_PROJECTIONS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                     "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


# Hugging Face's module -> how tensor parallelism splits it: (dim, what the rank's span counts)
PARALLEL_PROJECTIONS = {"q_proj": (COLUMN, "q"), "k_proj": (COLUMN, "kv"), "v_proj": (COLUMN, "kv"),
                        "gate_proj": (COLUMN, "mlp"), "up_proj": (COLUMN, "mlp"),
                        "o_proj": (ROW, "q"), "down_proj": (ROW, "mlp"),
                        "embed_tokens": (COLUMN, "vocab"), "lm_head": (COLUMN, "vocab")}


def tensor_parallel_split(module: str, shard, head_dim: int) -> Split | None:
    """The part of a Hugging Face module a rank holds ('model.layers.0.self_attn.o_proj' at tp=2, rank 1
    of SmolLM2: (1, 384, 576), its inputs 384..576); None where every rank holds all of it."""
    projection = module.rpartition(".")[2]
    if shard.size == 1 or projection not in PARALLEL_PROJECTIONS:
        return None
    dim, unit = PARALLEL_PROJECTIONS[projection]
    span = {"q": shard.q_heads.scaled(head_dim), "kv": shard.kv_heads.scaled(head_dim), "mlp": shard.mlp,
            "vocab": shard.vocab}[unit]
    return dim, span.start, span.stop


def fused_linear(in_features: int, slot_sizes: list[int], bias: bool) -> nn.Linear:
    """One nn.Linear computing several projections side by side, each a slot of `slot_sizes` rows."""
    linear = nn.Linear(in_features, sum(slot_sizes), bias=bias)
    linear.slot_sizes = slot_sizes  # read by WeightLoader, as vLLM's loaders read a parameter's attributes
    return linear


def fused_slot(module: str) -> tuple[str, int] | None:
    """Where a Hugging Face module's weights go among ours: (our fused module, slot), or None when it
    is not fused ('layers.0.self_attn.k_proj' -> ('layers.0.self_attn.qkv_proj', 1))."""
    parent, _, projection = module.rpartition(".")
    if projection not in FUSED_PROJECTIONS:
        return None
    fused, slot = FUSED_PROJECTIONS[projection]
    return f"{parent}.{fused}", slot


class WeightLoader:
    """Puts a checkpoint's weights, named as in our model, into it and checks that none is missing."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.slot_sizes = {name: m.slot_sizes for name, m in model.named_modules() if hasattr(m, "slot_sizes")}
        self.loaded: set[str] = set()  # parameter names; "name#slot" for each slot of a fused one
        self.slot_layers: dict[str, dict[int, nn.Module]] = {}  # fused module -> slot -> compressed layer

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        module, _, leaf = name.rpartition(".")
        if (slot := fused_slot(module)) is None:
            self.params[name].data.copy_(tensor)
            self.loaded.add(name)
            return
        fused, index = slot
        self.params[f"{fused}.{leaf}"].data[self._rows(fused, index)].copy_(tensor)
        self.loaded.add(f"{fused}.{leaf}#{index}")

    def load_layer(self, name: str, layer: nn.Module) -> None:
        """A compressed layer in place of our module `name`, or of one slot of a fused module."""
        if (slot := fused_slot(name)) is None:
            self.model.set_submodule(name, layer)  # the module's parameters leave the model with it
            return
        fused, index = slot
        self.slot_layers.setdefault(fused, {})[index] = layer
        self.loaded.update(f"{fused}.{leaf}#{index}" for leaf, _ in self.model.get_submodule(fused).named_parameters())

    def finish(self) -> None:
        """Check that every parameter got its weights, then rebuild the fused modules with compressed parts."""
        self._check_all_loaded()
        for fused, layers in self.slot_layers.items():
            linear = self.model.get_submodule(fused)
            parts = [layers[i] if i in layers else _slot_linear(linear, self._rows(fused, i))
                     for i in range(len(self.slot_sizes[fused]))]
            self.model.set_submodule(fused, fuse_rows(parts))

    def _rows(self, fused: str, slot: int) -> slice:
        sizes = self.slot_sizes[fused]
        start = sum(sizes[:slot])
        return slice(start, start + sizes[slot])

    def _check_all_loaded(self) -> None:
        missing = []
        for name, _ in self.model.named_parameters():
            sizes = self.slot_sizes.get(name.rpartition(".")[0])
            keys = [f"{name}#{i}" for i in range(len(sizes))] if sizes else [name]
            missing += [key for key in keys if key not in self.loaded]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:5])}")


def _slot_linear(fused: nn.Linear, rows: slice) -> nn.Linear:
    """A plain nn.Linear holding a copy of one slot of a fused linear's weights."""
    part = nn.Linear(fused.in_features, rows.stop - rows.start, bias=fused.bias is not None)
    part.load_state_dict({key: tensor[rows] for key, tensor in fused.state_dict().items()})
    return part
