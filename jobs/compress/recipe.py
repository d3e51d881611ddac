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

from typing import Annotated, Union

import torch
from pydantic import Field, model_validator
from torch import nn

from cluster.config import StrictConfig
from jobs.compress.calibration import CalibrationConfig, collect, token_batches
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

    def check(self, model: nn.Module) -> None:
        """Each step against the model as given: bad patterns and shapes fail before any work."""
        for index, step in enumerate(self.steps):
            try:
                step.check(model)
            except ValueError as exc:
                raise ValueError(f"recipe {self.name!r} step {index + 1}: {exc}") from None


def apply_recipe(model: nn.Module, recipe: Recipe, calibration_tokens: torch.Tensor | None,
                 progress: bool = True) -> list[dict]:
    """Apply every step in order, in place; one summary row per step. Statistics are gathered
    afresh for each step that needs them, from the model as the earlier steps left it."""
    recipe.check(model)
    report = []
    for index, step in enumerate(recipe.steps):
        stats = None
        if kinds := step.stats_needed():
            targets = step.targets(model)
            batches = token_batches(calibration_tokens, recipe.calibration)
            stats = collect(model, targets, kinds, batches, recipe.calibration.max_samples, progress)
        names = step.apply(model, stats)
        report.append({"step": index + 1, "method": step.method, "layers": len(names)})
    return report
