"""Per-layer sensitivity: how much quality moves when one layer alone is compressed.

Each chosen layer in turn is compressed with the step's settings for it, the model evaluated, and
the layer put back exactly as it was. Layers whose compression costs little are where a recipe
can be aggressive; the few that cost much get an override (more bits, or `exclude`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from jobs.compress.calibration import InputStats
from jobs.compress.step import Step


@dataclass(frozen=True)
class SensitivityRow:
    layer: str
    baseline: float
    compressed: float
    delta: float
    bytes_before: int
    bytes_after: int

    def row(self) -> dict:
        return asdict(self)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def layer_sensitivity(model: nn.Module, step: Step, evaluate: Callable[[nn.Module], float],
                      layers: list[str] | None = None, stats: dict[str, InputStats] | None = None,
                      progress: bool = True) -> list[SensitivityRow]:
    """One row per layer (default: every layer the step chooses); the model is left as it came."""
    if not step.PER_LAYER:
        raise ValueError(f"{step.method} acts on groups of layers together; sensitivity needs a per-layer method")
    step.check(model)
    names = layers or list(step.targets(model))
    baseline = evaluate(model)
    rows = []
    for name in tqdm(names, desc="sensitivity", unit="layer", disable=not progress):
        original = model.get_submodule(name)
        saved = {key: value.clone() for key, value in original.state_dict().items()}
        alone = step.for_layer(name).model_copy(update={"modules": [name], "exclude": [], "overrides": []})
        alone.apply(model, None if stats is None else {name: stats[name]})
        compressed = model.get_submodule(name)
        value = evaluate(model)
        rows.append(SensitivityRow(name, baseline, value, value - baseline, module_bytes(original),
                                   module_bytes(compressed)))
        with torch.no_grad():
            original.load_state_dict(saved)  # pruning changes a layer in place
        model.set_submodule(name, original)
    return rows
