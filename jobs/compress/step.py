"""One compression step: a typed config that picks linear layers by name and rewrites them in place.

A step names its method (`method: gptq`), the layers it touches (`modules`/`exclude`, fnmatch
patterns over module names such as `model.layers.*.mlp.down_proj`), and per-layer `overrides`:
each override lists patterns and some of the step's own fields, which replace the step's values for
the layers it matches (the last matching override wins). Subclasses add their fields, say which
calibration statistics they need (`STATS`), check a layer before any work (`check_layer`) and
compress one layer (`compress_layer`) — or override `apply` when they work on more than linears.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, ClassVar

from pydantic import Field, model_validator
from torch import nn
from tqdm import tqdm

from cluster.config import StrictConfig
from jobs.compress.calibration import InputStats

COMMON_FIELDS = {"method", "modules", "exclude", "overrides"}


class Override(StrictConfig):
    modules: list[str] = Field(min_length=1)
    # Extra keys are the step's own fields; the owning step checks them (Step._check_overrides).
    model_config = {**StrictConfig.model_config, "extra": "allow"}

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Step(StrictConfig):
    method: str
    modules: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                               description="module-name patterns (fnmatch) of the layers to compress")
    exclude: list[str] = Field(default_factory=list, description="module-name patterns left alone")
    overrides: list[Override] = Field(default_factory=list, description="per-layer settings")

    # Calibration statistics of each chosen layer's input this step needs (see InputStats).
    STATS: ClassVar[frozenset[str]] = frozenset()
    # Whether each chosen layer is compressed on its own (so one layer alone can be tried).
    PER_LAYER: ClassVar[bool] = True
    # Whether this step changes, on purpose, the inputs other layers see (rescales or removes input
    # channels), so that statistics taken before it no longer describe them.
    REWRITES_INPUTS: ClassVar[bool] = False

    @model_validator(mode="after")
    def _check_overrides(self):
        for override in self.overrides:
            unknown = set(override.settings()) - (set(type(self).model_fields) - COMMON_FIELDS)
            if unknown:
                raise ValueError(f"override sets unknown or fixed key(s) {sorted(unknown)} for method {self.method!r}")
            self.for_layer_from(override)  # validates the overridden values
        return self

    def for_layer_from(self, override: Override) -> Step:
        return type(self).model_validate({**self.model_dump(exclude={"overrides"}), **override.settings()})

    def for_layer(self, name: str) -> Step:
        """This step's settings for one layer, overrides applied."""
        chosen = self
        for override in self.overrides:
            if matches(name, override.modules):
                chosen = self.for_layer_from(override)
        return chosen

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The linears this step compresses; a pattern that matches no linear is an error."""
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        patterns = self.modules + self.exclude + [p for o in self.overrides for p in o.modules]
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in linears):
                example = next(iter(linears), None)
                raise ValueError(f"{self.method}: module pattern {pattern!r} matches no linear layer "
                                 f"(names look like {example!r})")
        return {name: m for name, m in linears.items()
                if matches(name, self.modules) and not matches(name, self.exclude)}

    def stats_needed(self) -> frozenset[str]:
        """The calibration statistics this instance needs (some methods need them only for some settings)."""
        return self.STATS

    def check(self, model: nn.Module) -> None:
        """Every problem this step would meet on `model`, raised before any layer changes."""
        targets = self.targets(model)
        if not targets:
            raise ValueError(f"{self.method}: no linear layer is left after `exclude`")
        for name, linear in targets.items():
            self.for_layer(name).check_layer(name, linear)

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        """Raise ValueError if this layer cannot be compressed with these settings."""

    def apply(self, model: nn.Module, stats: dict[str, InputStats] | None) -> list[str]:
        """Compress the chosen layers in place; returns the names of those it changed."""
        self.check(model)
        changed = []
        for name, linear in tqdm(self.targets(model).items(), desc=self.method, unit="layer", leave=False):
            replacement = self.for_layer(name).compress_layer(name, linear, None if stats is None else stats[name])
            if replacement is None:
                continue
            if replacement is not linear:
                model.set_submodule(name, replacement)
            changed.append(name)
        return changed

    def compress_layer(self, name: str, linear: nn.Linear, stats: InputStats | None) -> nn.Module | None:
        """The layer's compressed replacement; `linear` itself if changed in place; None if left as it was."""
        raise NotImplementedError

    def fake_quant_layer(self, linear: nn.Linear) -> nn.Module:
        """The layer as quantization-aware training sees it: float weights, quantized on the fly exactly as
        `compress_layer` will quantize them. Methods without such a form cannot be trained for."""
        raise ValueError(f"{self.method} has no quantization-aware training form; "
                         "QAT trains for round-to-nearest weights (`rtn`) and dynamic `w8a8`")


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)
