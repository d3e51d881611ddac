"""Round-to-nearest weight-only quantization: swap matching nn.Linear layers for kernels'
Int8/Int4/Int3/Int2WeightOnlyLinear, in place (as torchao's `quantize_(model, config)`).

Every matching layer is checked before any is swapped, so a bad config changes nothing.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from jobs.compress.calibration import InputStats
from jobs.compress.step import Step
from kernels.fake_quant_linear import FakeQuantLinear
from kernels.quant_linear import (Int2WeightOnlyLinear, Int3WeightOnlyLinear, Int4WeightOnlyLinear,
                                  Int8WeightOnlyLinear)

LAYERS = {8: Int8WeightOnlyLinear, 4: Int4WeightOnlyLinear, 3: Int3WeightOnlyLinear, 2: Int2WeightOnlyLinear}


class WeightOnlyBits(Step):
    """Fields every weight-only quantizer shares (RTN, GPTQ, AWQ)."""

    bits: Literal[2, 3, 4, 8] = 8
    group_size: int | None = Field(None, ge=2, description="inputs per scale; none: one scale per output row")

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        if self.group_size is not None and linear.in_features % self.group_size:
            raise ValueError(f"{self.method}: group_size {self.group_size} does not divide {name}'s "
                             f"{linear.in_features} inputs; set a group size that does for it under `overrides`")
        codes_per_pack = LAYERS[self.bits].codes_per_pack
        if linear.in_features % codes_per_pack:
            raise ValueError(f"{self.method}: {self.bits}-bit codes are stored {codes_per_pack} inputs at a time, "
                             f"and {name}'s {linear.in_features} inputs are not a multiple of {codes_per_pack}; "
                             f"give it other bits under `overrides` (or exclude it)")


class WeightOnlyConfig(WeightOnlyBits):
    method: Literal["rtn"] = "rtn"

    def compress_layer(self, name: str, linear: nn.Linear, stats: InputStats | None) -> nn.Module:
        return LAYERS[self.bits].from_linear(linear, self.group_size)

    def fake_quant_layer(self, linear: nn.Linear) -> nn.Module:
        return FakeQuantLinear.from_linear(linear, LAYERS[self.bits].weight_spec(self.group_size))
