"""Gradual magnitude pruning during training, on the cubic schedule of Zhu & Gupta (2017).

    s(t) = s_final + (s_initial - s_final) * (1 - (t - start) / (end - start))^3,  start <= t <= end

Sparsity rises fast while the network has plenty of redundant weights and slowly near the end, so
training has time to recover. Every `every` steps in that window each chosen layer is pruned by
magnitude to s(t); after every optimizer step the masks are applied again so pruned weights stay
zero (call `pruner.step(t)` right after `optimizer.step()`).
"""
from __future__ import annotations

import torch
from torch import nn

from jobs.compress.prune import MagnitudeConfig, unstructured_mask


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    if not 0 <= initial <= final < 1 or end <= start:
        raise ValueError(f"need 0 <= initial <= final < 1 and start < end, got {initial}, {final}, {start}, {end}")
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1 - progress) ** 3


class GradualPruner:
    def __init__(self, model: nn.Module, final_sparsity: float, start: int, end: int, every: int = 1,
                 initial_sparsity: float = 0.0, modules: list[str] | None = None, exclude: list[str] | None = None):
        cubic_sparsity(start, initial_sparsity, final_sparsity, start, end)  # checks the schedule
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        selection = MagnitudeConfig(sparsity=final_sparsity, modules=modules or ["*"], exclude=exclude or [])
        self.layers = selection.targets(model)
        self.schedule = (initial_sparsity, final_sparsity, start, end)
        self.every = every
        self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in self.layers.items()}
        self.sparsity = 0.0

    @torch.no_grad()
    def step(self, training_step: int) -> float:
        """Update masks when the schedule says so, reapply them; returns the current target sparsity."""
        initial, final, start, end = self.schedule
        if start <= training_step <= end and (training_step - start) % self.every == 0:
            self.sparsity = cubic_sparsity(training_step, initial, final, start, end)
            for name, linear in self.layers.items():
                # pruned weights are zero, the smallest magnitudes: they stay pruned as sparsity grows
                self.masks[name] = unstructured_mask(linear.weight.abs() * self.masks[name], self.sparsity)
        for name, linear in self.layers.items():
            linear.weight.mul_(self.masks[name])
        return self.sparsity
