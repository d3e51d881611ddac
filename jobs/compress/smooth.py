"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

A few input channels of a transformer's linears carry activations far larger than the rest, so
one activation scale per token (or tensor) wastes most of int8's range on them. For linears fed by
a norm, channel j of the input is divided by

    s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)      (weights: over every linear of the group)

and the linears' weight columns multiplied by it: the products are unchanged, the activations
flatter, the weights a little less so. The division is folded into the norm's weight, so it costs
nothing at run time. Groups in a Llama decoder layer: input_layernorm -> q, k, v and
post_attention_layernorm -> gate, up. This step only rescales; a w8a8 step after it quantizes.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from jobs.compress.calibration import InputStats
from jobs.compress.step import Step

NORM_FED = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    weight_max = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)
    tiny = torch.finfo(torch.float32).tiny
    return (act_max.clamp_min(tiny) ** alpha / weight_max.clamp_min(tiny) ** (1 - alpha)).clamp_min(1e-5)


def norm_fed_groups(model: nn.Module, chosen: set[str]) -> list[tuple[str, list[str]]]:
    """(norm name, the chosen linears it feeds) for every group all of whose linears are chosen."""
    groups = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf in NORM_FED and hasattr(module, "weight"):
            members = [f"{parent}.{linear}" for linear in NORM_FED[leaf]]
            if all(m in chosen for m in members):
                groups.append((name, members))
    return groups


class SmoothQuantConfig(Step):
    method: Literal["smoothquant"] = "smoothquant"
    PER_LAYER = False
    alpha: float = Field(0.5, ge=0, le=1, description="how much of the activations' range moves to the weights")

    STATS = frozenset({"abs_max"})
    REWRITES_INPUTS = True

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if self.overrides:
            raise ValueError("smoothquant: one alpha for all groups (no overrides)")
        if not norm_fed_groups(model, set(self.targets(model))):
            raise ValueError("smoothquant: none of the chosen linears form a whole norm-fed group "
                             "(q/k/v after input_layernorm, gate/up after post_attention_layernorm)")

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: dict[str, InputStats] | None) -> list[str]:
        self.check(model)
        changed = []
        for norm_name, members in norm_fed_groups(model, set(self.targets(model))):
            linears = [model.get_submodule(m) for m in members]
            scales = smoothing_scales(stats[members[0]].abs_max, [m.weight for m in linears], self.alpha)
            model.get_submodule(norm_name).weight.div_(scales)
            for linear in linears:
                linear.weight.mul_(scales)
            changed += members
        return changed
