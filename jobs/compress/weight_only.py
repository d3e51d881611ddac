"""Round-to-nearest weight-only quantization: swap matching nn.Linear layers for kernels'
Int8WeightOnlyLinear / Int4WeightOnlyLinear, in place (as torchao's `quantize_(model, config)`).

Every matching layer is checked before any is swapped, so a bad config changes nothing.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

from pydantic import Field
from torch import nn

from cluster.config import StrictConfig
from kernels.quant_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear

LAYERS = {8: Int8WeightOnlyLinear, 4: Int4WeightOnlyLinear}


class WeightOnlyConfig(StrictConfig):
    bits: Literal[4, 8] = 8
    group_size: int | None = Field(None, ge=2, description="inputs per scale; none: one scale per output row")
    modules: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                               description="module-name patterns (fnmatch) of the linears to quantize")
    exclude: list[str] = Field(default_factory=list, description="module-name patterns left in float")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def matching_linears(model: nn.Module, config: WeightOnlyConfig) -> dict[str, nn.Linear]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pattern in config.modules + config.exclude:
        if not _matches_any(linears, pattern):
            raise ValueError(f"module pattern {pattern!r} matches no linear layer (e.g. {next(iter(linears), None)!r})")
    return {name: m for name, m in linears.items()
            if _matches(name, config.modules) and not _matches(name, config.exclude)}


def _matches_any(linears: dict[str, nn.Linear], pattern: str) -> bool:
    return any(fnmatchcase(name, pattern) for name in linears)


def quantize_weights(model: nn.Module, config: WeightOnlyConfig) -> list[str]:
    """Swap the matching linears in place; returns their names."""
    chosen = matching_linears(model, config)
    for name, linear in chosen.items():
        if config.group_size is not None and linear.in_features % config.group_size:
            raise ValueError(f"group_size {config.group_size} does not divide {name}'s {linear.in_features} inputs")
    for name, linear in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LAYERS[config.bits].from_linear(linear, config.group_size))
    return list(chosen)
