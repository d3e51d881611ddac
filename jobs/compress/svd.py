"""Low-rank compression by truncated SVD, the rank chosen per layer by retained energy.

`energy: 0.9` keeps the smallest rank r whose singular values hold 90% of the sum of all squared
singular values (the squared Frobenius norm) — or a fixed `rank`. A layer is replaced only if its
factors are smaller than the matrix by at least `min_saving`; otherwise it stays dense (the step
logs which and why), since a low-rank layer that is not smaller is only less accurate.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from jobs.compress.calibration import InputStats
from jobs.compress.step import Step
from kernels.low_rank import LowRankLinear

log = logging.getLogger(__name__)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose squared singular values reach `energy` of their total."""
    squares = singular_values.double().square()
    kept = squares.cumsum(0) / squares.sum()
    return min(int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1,
               len(singular_values))


class SVDConfig(Step):
    method: Literal["svd"] = "svd"
    energy: float | None = Field(None, gt=0, le=1, description="fraction of squared singular values kept")
    rank: int | None = Field(None, ge=1, description="a fixed rank instead of `energy`")
    min_saving: float = Field(0.0, ge=0, lt=1, description="replace a layer only if this much smaller")

    @model_validator(mode="after")
    def _energy_or_rank(self):
        if (self.energy is None) == (self.rank is None):
            raise ValueError("give exactly one of `energy` and `rank`")
        return self

    def chosen_rank(self, linear: nn.Linear) -> int:
        if self.rank is not None:
            return min(self.rank, min(linear.weight.shape))
        return rank_for_energy(torch.linalg.svdvals(linear.weight.detach().double()), self.energy)

    def compress_layer(self, name: str, linear: nn.Linear, stats: InputStats | None) -> nn.Module | None:
        rank = self.chosen_rank(linear)
        factored, dense = rank * (linear.in_features + linear.out_features), linear.in_features * linear.out_features
        if factored >= (1 - self.min_saving) * dense:
            log.info("svd: %s stays dense: rank %d would store %d weights of %d", name, rank, factored, dense)
            return None
        return LowRankLinear.from_linear(linear, rank)
