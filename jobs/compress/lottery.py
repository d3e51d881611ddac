"""Lottery tickets (Frankle & Carbin, 2019): iterative magnitude pruning with rewinding.

Train; prune `prune_fraction` of the weights still alive in each chosen layer, smallest magnitude
first; rewind the survivors to their values at the rewind point (the initial weights, or early
in training — Frankle et al., 2020, for larger networks); train again; repeat. After k rounds the
sparsity is 1 - (1 - prune_fraction)^k. For small models: every round is a full training run.

`train(model, masks)` trains for a fixed budget and returns its final loss; it must keep masked
weights at zero (`apply_masks` after each optimizer step).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from jobs.compress.prune import MagnitudeConfig

Masks = dict[str, torch.Tensor]


@dataclass
class Ticket:
    masks: Masks
    rounds: list[dict] = field(default_factory=list)  # per round: sparsity, loss


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    for name, mask in masks.items():
        model.get_submodule(name).weight.mul_(mask)


def _prune_alive(weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    alive = weight.abs()[mask]
    drop = int(round(fraction * alive.numel()))
    if drop == 0:
        return mask
    threshold = alive.kthvalue(drop).values
    return mask & (weight.abs() > threshold)


def find_ticket(model: nn.Module, train: Callable[[nn.Module, Masks], float], rounds: int, prune_fraction: float,
                rewind_to: dict[str, torch.Tensor] | None = None, modules: list[str] | None = None,
                exclude: list[str] | None = None) -> Ticket:
    """`rewind_to`: weights (by layer name) survivors return to; default: the model's weights now."""
    if rounds < 1 or not 0 < prune_fraction < 1:
        raise ValueError(f"need rounds >= 1 and 0 < prune_fraction < 1, got {rounds}, {prune_fraction}")
    layers = MagnitudeConfig(sparsity=0.0, modules=modules or ["*"], exclude=exclude or []).targets(model)
    rewind = rewind_to or {name: m.weight.detach().clone() for name, m in layers.items()}
    masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in layers.items()}
    ticket = Ticket(masks, [{"round": 0, "sparsity": 0.0, "loss": train(model, masks)}])
    for round_index in range(1, rounds + 1):
        with torch.no_grad():
            for name, linear in layers.items():
                masks[name] = _prune_alive(linear.weight, masks[name], prune_fraction)
                linear.weight.copy_(rewind[name] * masks[name])
        loss = train(model, masks)
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        ticket.rounds.append({"round": round_index, "sparsity": 1 - kept, "loss": loss})
    return ticket
