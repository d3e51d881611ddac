"""A recipe: compression steps applied in order, with the calibration data the steps need.

    name: int4-gptq-g128
    calibration: {data: shakespeare, samples: 64, seq_len: 512}
    steps:
      - method: gptq
        bits: 4
        group_size: 128
        exclude: [lm_head]

Each step is one of STEP_TYPES, chosen by its `method`; unknown methods and keys are errors.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Union

import torch
from pydantic import Field, model_validator
from torch import nn

from cluster.config import StrictConfig
from jobs.compress.calibration import CalibrationConfig, InputStats, collect, token_batches
from jobs.compress.gptq import GPTQConfig
from jobs.compress.prune import MagnitudeConfig, WandaConfig
from jobs.compress.smooth import SmoothQuantConfig
from jobs.compress.step import Step
from jobs.compress.structured import StructuredConfig
from jobs.compress.svd import SVDConfig
from jobs.compress.w8a8 import W8A8Config
from jobs.compress.weight_only import WeightOnlyConfig

STEP_TYPES: tuple[type[Step], ...] = (WeightOnlyConfig, GPTQConfig, MagnitudeConfig, WandaConfig, W8A8Config,
                                        SVDConfig, SmoothQuantConfig, StructuredConfig)
AnyStep = Annotated[Union[STEP_TYPES], Field(discriminator="method")]  # noqa: UP007 (a runtime tuple)


class Recipe(StrictConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    calibration: CalibrationConfig | None = None
    steps: list[AnyStep] = Field(min_length=1)

    @model_validator(mode="after")
    def _calibration_when_needed(self):
        needing = [s.method for s in self.steps if s.stats_needed()]
        if needing and self.calibration is None:
            raise ValueError(f"step(s) {', '.join(needing)} need calibration data: add `calibration: {{data: ...}}`")
        return self

    @model_validator(mode="after")
    def _original_stats_still_describe_the_inputs(self):
        """Statistics of the original model are an approximation after steps that only perturb layers'
        outputs, but wrong after a step that rescales or removes input channels on purpose."""
        if not self.uses_original_stats():
            return self
        for index, step in enumerate(self.steps):
            later = [s.method for s in self.steps[index + 1:] if s.stats_needed()]
            if step.REWRITES_INPUTS and later:
                raise ValueError(f"stats_from: original cannot serve {', '.join(later)} after {step.method}, which "
                                 f"changes the inputs those steps calibrate on; use stats_from: sequential")
        return self

    def uses_original_stats(self) -> bool:
        """Whether one pass over the original model serves every step (rather than one pass per step)."""
        return self.calibration is not None and self.calibration.stats_from == "original"

    def check(self, model: nn.Module) -> None:
        """Each step against the model as given: bad patterns and shapes fail before any work."""
        for index, step in enumerate(self.steps):
            try:
                step.check(model)
            except ValueError as exc:
                raise ValueError(f"recipe {self.name!r} step {index + 1}: {exc}") from None


def apply_recipe(model: nn.Module, recipe: Recipe, calibration_tokens: torch.Tensor | None,
                 progress: bool = True, stats: dict[str, InputStats] | None = None) -> list[dict]:
    """Apply every step in order, in place; one summary row per step. With `stats_from: sequential`
    statistics are gathered afresh for each step that needs them, from the model as the earlier steps
    left it. With `stats_from: original` they come from the untouched model, in one pass before any
    step, or from `stats` when the caller has them already (see stats_cache)."""
    recipe.check(model)
    if recipe.uses_original_stats():
        stats_for = _original_stats(model, recipe, calibration_tokens, progress, stats)
    elif stats is not None:
        raise ValueError("statistics given to apply_recipe are used only with `stats_from: original`")
    else:
        stats_for = _sequential_stats(model, recipe, calibration_tokens, progress)
    report = []
    for index, step in enumerate(recipe.steps):
        names = step.apply(model, stats_for(index, step))
        report.append({"step": index + 1, "method": step.method, "layers": len(names)})
    return report


StatsForStep = Callable[[int, Step], "dict[str, InputStats] | None"]


def _sequential_stats(model: nn.Module, recipe: Recipe, calibration_tokens: torch.Tensor | None,
                      progress: bool) -> StatsForStep:
    def stats_for(index: int, step: Step) -> dict[str, InputStats] | None:
        if not (kinds := step.stats_needed()):
            return None
        batches = token_batches(calibration_tokens, recipe.calibration)
        return collect(model, step.targets(model), kinds, batches, recipe.calibration.max_samples, progress)

    return stats_for


def _original_stats(model: nn.Module, recipe: Recipe, calibration_tokens: torch.Tensor | None, progress: bool,
                    stats: dict[str, InputStats] | None) -> StatsForStep:
    """Each step's share of one set of statistics of the untouched model. The layers each step reads
    are fixed now, on the untouched model, before any step replaces or reshapes one."""
    layers_by_step = [sorted(step.targets(model)) if step.stats_needed() else [] for step in recipe.steps]
    if stats is None:
        kinds, layers = stats_to_collect(model, recipe)
        stats = collect_original(model, recipe, calibration_tokens, kinds, layers, progress) if kinds else {}
    for step, layers in zip(recipe.steps, layers_by_step, strict=True):
        check_covers(stats, step.stats_needed(), layers, step.method)

    def stats_for(index: int, step: Step) -> dict[str, InputStats] | None:
        return {name: stats[name] for name in layers_by_step[index]} if layers_by_step[index] else None

    return stats_for


def stats_to_collect(model: nn.Module, recipe: Recipe) -> tuple[frozenset[str], list[str]]:
    """The kinds of statistics and the (sorted) layers that one pass over `model` must cover to serve
    every step of `recipe`: the union over the steps, each layer getting every kind."""
    kinds: set[str] = set()
    layers: set[str] = set()
    for step in recipe.steps:
        if needed := step.stats_needed():
            kinds |= needed
            layers |= set(step.targets(model))
    return frozenset(kinds), sorted(layers)


def collect_original(model: nn.Module, recipe: Recipe, calibration_tokens: torch.Tensor, kinds: frozenset[str],
                     layers: list[str], progress: bool = True) -> dict[str, InputStats]:
    """`kinds` of statistics of `layers`' inputs over the recipe's calibration batches, in one pass."""
    batches = token_batches(calibration_tokens, recipe.calibration)
    modules = {name: model.get_submodule(name) for name in layers}
    return collect(model, modules, kinds, batches, recipe.calibration.max_samples, progress)


def check_covers(stats: dict[str, InputStats], kinds: frozenset[str], layers: list[str], method: str) -> None:
    """Refuse statistics that lack a layer or a kind a step needs, or are not finished."""
    for name in layers:
        if name not in stats:
            raise ValueError(f"{method}: the statistics given have none for layer {name}")
        if missing := kinds - stats[name].kinds():
            raise ValueError(f"{method}: the statistics given for {name} lack {sorted(missing)}")
        if not stats[name].is_final:
            raise ValueError(f"{method}: the statistics given for {name} are not finished (InputStats.finish)")
