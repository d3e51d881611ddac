"""W8A8: int8 weights and int8 activations (kernels.w8a8_linear.W8A8Linear).

`activations: dynamic` is dynamic quantization: each token's activations get their own scale at
run time, nothing is calibrated. `activations: static` fixes one scale per layer from calibration
data, chosen by an observer:
- minmax: the largest |x| seen maps to 127 (no activation is ever clipped)
- percentile: the `percentile`-th percentile of |x| maps to 127 (rare outliers clip, the rest
  get finer steps)
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from jobs.compress.calibration import InputStats
from jobs.compress.step import Step
from kernels.fake_quant_linear import FakeQuantLinear
from kernels.w8a8_linear import ACT_MAX, W8A8Linear


def minmax_scale(stats: InputStats) -> torch.Tensor:
    return (stats.abs_max.max() / ACT_MAX).reshape(1)


def percentile_scale(stats: InputStats, percentile: float) -> torch.Tensor:
    magnitudes = stats.samples.abs().flatten().float()
    return (torch.quantile(magnitudes[:: max(1, magnitudes.numel() // 2**24 + 1)], percentile / 100) / ACT_MAX
            ).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)


class W8A8Config(Step):
    method: Literal["w8a8"] = "w8a8"
    activations: Literal["dynamic", "static"] = "dynamic"
    observer: Literal["minmax", "percentile"] | None = Field(None, description="static only; default minmax")
    percentile: float = Field(99.99, gt=0, le=100, description="for the percentile observer")

    STATS = frozenset({"abs_max", "samples"})  # all a static observer may ask for

    @model_validator(mode="after")
    def _observer_is_static_only(self):
        if self.activations == "dynamic" and self.observer is not None:
            raise ValueError("an observer calibrates static activation scales; dynamic activations take none")
        return self

    def stats_needed(self) -> frozenset[str]:
        settings = [self, *(self.for_layer_from(o) for o in self.overrides)]
        return frozenset().union(*(s._observer_needs() for s in settings))

    def _observer_needs(self) -> frozenset[str]:
        if self.activations == "dynamic":
            return frozenset()
        return frozenset({"samples"}) if self.observer == "percentile" else frozenset({"abs_max"})

    def fake_quant_layer(self, linear: nn.Linear) -> nn.Module:
        if self.activations != "dynamic":
            raise ValueError("QAT trains for dynamic w8a8 only: static activation scales come from calibration "
                             "after training; set `activations: dynamic`")
        return FakeQuantLinear.from_linear(linear, W8A8Linear.WEIGHT_SPEC, activation_bits=8)

    def compress_layer(self, name: str, linear: nn.Linear, stats: InputStats | None) -> nn.Module:
        if self.activations == "dynamic":
            return W8A8Linear.from_linear(linear)
        scale = percentile_scale(stats, self.percentile) if self.observer == "percentile" else minmax_scale(stats)
        return W8A8Linear.from_linear(linear, scale)
