"""Compressed checkpoints in the engine: each compressed layer takes the place of our model's
linear, fused the way our model fuses its projections (q/k/v, gate/up).

A fused projection whose parts are all compressed in one format that can concatenate its rows
(int8/int4 weight-only with one group size) becomes one compressed layer; other mixes run their
parts side by side (kernels.compressed.StackedLinear).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kernels.compressed import fuse_rows, read_checkpoint


def _plain_linear(tensors: dict[str, torch.Tensor], name: str) -> nn.Linear:
    weight = tensors.pop(f"{name}.weight")
    bias = tensors.pop(f"{name}.bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias
    return linear


def install_compressed(model: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Put the checkpoint's compressed layers into our `model` (names: Hugging Face's); returns the
    plain tensors left to load and the names of the modules installed whole."""
    layers, tensors = read_checkpoint(path)
    fused: dict[str, dict[int, str]] = {}  # our fused module -> part index -> HF module name
    for hf_name in layers:
        parent, _, proj = hf_name.removeprefix("model.").rpartition(".")
        if proj in model.FUSED:
            target, index = model.FUSED[proj]
            fused.setdefault(f"{parent}.{target}", {})[index] = hf_name
        else:
            model.set_submodule(hf_name.removeprefix("model."), layers[hf_name])
    installed = {name.removeprefix("model.") for name in layers if name.rpartition(".")[2] not in model.FUSED}
    for target, parts in fused.items():
        hf_parent = "model." + target.rpartition(".")[0]
        projections = sorted((i, p) for p, (t, i) in model.FUSED.items() if t == target.rpartition(".")[2])
        modules = [layers[parts[i]] if i in parts else _plain_linear(tensors, f"{hf_parent}.{proj}")
                   for i, proj in projections]
        model.set_submodule(target, fuse_rows(modules))
        installed.add(target)
    return tensors, installed
