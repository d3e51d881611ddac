"""Unstructured and N:M pruning: zero the weights whose score is lowest.

- magnitude: score |W|; the sparsity holds per layer, or over all chosen layers at once
  (`scope: global`, one threshold: layers with many small weights give up more).
- wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, the weight times the norm of its input over
  calibration tokens, compared within each output row as the paper does; no weight update.

`pattern: "N:M"` keeps the N highest-scoring weights of every M consecutive inputs of a row
("2:4": half the weights, in the layout sparse tensor cores run); the sparsity is then 1 - N/M.
Pruned weights are written as zeros into the layer (`format: dense`, a checkpoint every tool
loads), or only the kept weights are stored (`format: sparse`: kernels.sparse_linear).
"""
from __future__ import annotations

import re
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from jobs.compress.calibration import InputStats
from jobs.compress.step import Step
from kernels.sparse_linear import SemiStructuredLinear, SparseLinear

N_OF_M = re.compile(r"^(\d+):(\d+)$")


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """True where a weight is kept: the lowest `sparsity` fraction of scores (per row or in all) go."""
    flat = score.reshape(score.shape[0], -1) if per_row else score.reshape(1, -1)
    drop = int(round(sparsity * flat.shape[1]))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        keep.scatter_(1, flat.topk(drop, dim=1, largest=False).indices, False)
    return keep.view_as(score)


def n_of_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where kept: the n highest scores of every m consecutive inputs of each row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.view(rows, cols)


def global_threshold(scores: list[torch.Tensor], sparsity: float) -> float:
    """The score below which `sparsity` of all the scores together lie."""
    everything = torch.cat([s.reshape(-1) for s in scores])
    drop = int(round(sparsity * everything.numel()))
    return float("-inf") if drop == 0 else everything.kthvalue(drop).values.item()


class PruneStep(Step):
    PER_ROW: ClassVar[bool] = False  # compare scores within each output row, not across the layer
    sparsity: float | None = Field(None, ge=0, lt=1, description="fraction of weights set to zero")
    pattern: str = Field("unstructured", description='"unstructured", or "N:M" such as "2:4"')
    format: Literal["dense", "sparse"] = Field("dense", description="zeros in the weight, or only the kept "
                                                                     "weights stored (kernels.sparse_linear)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value != "unstructured":
            match = N_OF_M.match(value)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f'pattern must be "unstructured" or "N:M" with 0 < N < M, got {value!r}')
        return value

    @model_validator(mode="after")
    def _sparsity_fits_pattern(self):
        if self.pattern == "unstructured" and self.sparsity is None:
            raise ValueError("unstructured pruning needs a sparsity in [0, 1)")
        if self.n_of_m and self.sparsity is not None:
            implied = 1 - self.n_of_m[0] / self.n_of_m[1]
            if abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"pattern {self.pattern} means sparsity {implied:g}; drop `sparsity` or make it agree")
        return self

    @property
    def n_of_m(self) -> tuple[int, int] | None:
        match = N_OF_M.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    def check_layer(self, name: str, linear: nn.Linear) -> None:
        if self.n_of_m and linear.in_features % self.n_of_m[1]:
            raise ValueError(f"{self.method}: {name}'s {linear.in_features} inputs do not split into groups of "
                             f"{self.n_of_m[1]} for pattern {self.pattern}")

    def score(self, linear: nn.Linear, stats: InputStats | None) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, score: torch.Tensor) -> torch.Tensor:
        if self.n_of_m:
            return n_of_m_mask(score, *self.n_of_m)
        return unstructured_mask(score, self.sparsity, per_row=self.PER_ROW)

    @torch.no_grad()
    def compress_layer(self, name: str, linear: nn.Linear, stats: InputStats | None) -> nn.Module:
        linear.weight.mul_(self.mask(self.score(linear, stats)))
        return self.stored(linear)

    def stored(self, linear: nn.Linear) -> nn.Module:
        if self.format == "dense":
            return linear
        if self.pattern == "2:4" and linear.in_features % 8 == 0:
            return SemiStructuredLinear.from_linear(linear)
        return SparseLinear.from_linear(linear)


class MagnitudeConfig(PruneStep):
    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "global"] = Field("layer", description="one sparsity per layer, or over all at once")

    @model_validator(mode="after")
    def _global_is_unstructured(self):
        if self.scope == "global" and (self.n_of_m or self.overrides):
            raise ValueError("scope global takes one unstructured sparsity for all layers (no N:M, no overrides)")
        return self

    def score(self, linear: nn.Linear, stats: InputStats | None) -> torch.Tensor:
        return linear.weight.detach().abs()

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: dict[str, InputStats] | None) -> list[str]:
        if self.scope == "layer":
            return super().apply(model, stats)
        self.check(model)
        targets = self.targets(model)
        threshold = global_threshold([self.score(m, None) for m in targets.values()], self.sparsity)
        for name, linear in targets.items():
            linear.weight.mul_(self.score(linear, None) > threshold)
            if (replacement := self.stored(linear)) is not linear:
                model.set_submodule(name, replacement)
        return list(targets)


class WandaConfig(PruneStep):
    method: Literal["wanda"] = "wanda"

    STATS = frozenset({"sq_norm"})
    PER_ROW = True  # the paper compares weights feeding the same output

    def score(self, linear: nn.Linear, stats: InputStats | None) -> torch.Tensor:
        return linear.weight.detach().abs() * stats.sq_norm.sqrt()[None, :]
