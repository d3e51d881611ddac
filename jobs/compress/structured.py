"""Structured pruning: remove whole attention heads, MLP neurons or decoder layers.

The model gets physically smaller and stays a normal Hugging Face Llama: the same number of heads
(whole key/value groups under grouped-query attention) or neurons is removed from every decoder
layer, and the config says so, so transformers and our engine load the result as they load any
model. What goes is what scores lowest in its layer (for `layers`, in the model):

- magnitude: the weights' norms — a head's q/k/v rows and o_proj columns, a neuron's gate and up
  rows times its down_proj column, a layer's o_proj and down_proj
- activation: the energy the part adds to the output over calibration data, E||W_part x_part||^2,
  from the inputs' statistics: per input channel (sq_norm) for heads and neurons; the full second
  moment (hessian) of o_proj's and down_proj's inputs for a layer's contribution to the residual
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from jobs.compress.calibration import InputStats
from jobs.compress.step import Step
from serve_apps.engine.models.llama import attention_head_dim


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    out.weight.data = weight.clone()
    if linear.bias is not None:
        out.bias.data = (linear.bias.detach() if rows is None else linear.bias.detach()[rows]).clone()
    return out


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    return set(scores.argsort()[:count].tolist())


class StructuredConfig(Step):
    method: Literal["structured"] = "structured"
    PER_LAYER = False
    REWRITES_INPUTS = True
    target: Literal["heads", "neurons", "layers"]
    fraction: float = Field(ge=0, lt=1, description="of each layer's heads or neurons, or of the layers")
    score: Literal["magnitude", "activation"] = "magnitude"

    def stats_needed(self) -> frozenset[str]:
        if self.score == "magnitude":
            return frozenset()
        return frozenset({"hessian"}) if self.target == "layers" else frozenset({"sq_norm"})

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The linears whose inputs the activation scores read."""
        leaf = {"heads": "o_proj", "neurons": "down_proj", "layers": ("o_proj", "down_proj")}[self.target]
        return {name: m for name, m in super().targets(model).items() if name.endswith(leaf)}

    def check(self, model: nn.Module) -> None:
        if self.modules != ["*"] or self.exclude or self.overrides:
            raise ValueError("structured pruning acts on every decoder layer alike: no modules, exclude or overrides")
        if not hasattr(getattr(model, "model", None), "layers"):
            raise ValueError("structured pruning needs a Hugging Face decoder (model.model.layers)")
        config = model.config
        if self.target == "heads" and round(self.fraction * config.num_key_value_heads) >= config.num_key_value_heads:
            raise ValueError(f"fraction {self.fraction} would remove every one of {config.num_key_value_heads} "
                             f"key/value head groups")
        if self.target == "layers" and round(self.fraction * config.num_hidden_layers) >= config.num_hidden_layers:
            raise ValueError(f"fraction {self.fraction} would remove all {config.num_hidden_layers} layers")

    @torch.no_grad()
    def apply(self, model: nn.Module, stats: dict[str, InputStats] | None) -> list[str]:
        self.check(model)
        prune = {"heads": self._prune_heads, "neurons": self._prune_neurons, "layers": self._prune_layers}
        return prune[self.target](model, stats or {})

    def _prune_heads(self, model: nn.Module, stats: dict[str, InputStats]) -> list[str]:
        config = model.config
        head_dim = attention_head_dim(config)
        group = config.num_attention_heads // config.num_key_value_heads
        drop = round(self.fraction * config.num_key_value_heads)
        changed = []
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            name = f"model.layers.{index}.self_attn"
            scores = self._head_scores(attn, stats.get(f"{name}.o_proj"), head_dim, group, config.num_key_value_heads)
            gone = _lowest(scores, drop)
            kv_keep = [g for g in range(config.num_key_value_heads) if g not in gone]
            kv_dims = torch.tensor([g * head_dim + d for g in kv_keep for d in range(head_dim)])
            q_dims = torch.tensor([(g * group + h) * head_dim + d for g in kv_keep for h in range(group)
                                   for d in range(head_dim)])
            attn.q_proj, attn.o_proj = _sliced(attn.q_proj, rows=q_dims), _sliced(attn.o_proj, cols=q_dims)
            attn.k_proj, attn.v_proj = _sliced(attn.k_proj, rows=kv_dims), _sliced(attn.v_proj, rows=kv_dims)
            changed += [f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        config.head_dim = head_dim  # no longer hidden_size / heads
        config.num_key_value_heads -= drop
        config.num_attention_heads = config.num_key_value_heads * group
        return changed

    def _head_scores(self, attn, o_stats: InputStats | None, head_dim: int, group: int, kv_heads: int):
        o_cols = attn.o_proj.weight.square().sum(0)  # [q dims]
        if self.score == "activation":
            return (o_stats.sq_norm * o_cols).view(kv_heads, group * head_dim).sum(1)
        q = attn.q_proj.weight.square().sum(1).view(kv_heads, -1).sum(1)
        kv = (attn.k_proj.weight.square().sum(1) + attn.v_proj.weight.square().sum(1)).view(kv_heads, -1).sum(1)
        return q + kv + o_cols.view(kv_heads, -1).sum(1)

    def _prune_neurons(self, model: nn.Module, stats: dict[str, InputStats]) -> list[str]:
        size = model.config.intermediate_size
        keep_count = size - round(self.fraction * size)
        changed = []
        for index, layer in enumerate(model.model.layers):
            mlp, name = layer.mlp, f"model.layers.{index}.mlp"
            down_cols = mlp.down_proj.weight.square().sum(0)
            if self.score == "activation":
                scores = stats[f"{name}.down_proj"].sq_norm * down_cols
            else:
                scores = (mlp.gate_proj.weight.square().sum(1) * mlp.up_proj.weight.square().sum(1) * down_cols)
            keep = scores.argsort(descending=True)[:keep_count].sort().values
            mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, rows=keep), _sliced(mlp.up_proj, rows=keep)
            mlp.down_proj = _sliced(mlp.down_proj, cols=keep)
            changed += [f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        model.config.intermediate_size = keep_count
        return changed

    def _prune_layers(self, model: nn.Module, stats: dict[str, InputStats]) -> list[str]:
        layers = model.model.layers
        scores = torch.stack([self._layer_score(i, layer, stats) for i, layer in enumerate(layers)])
        gone = _lowest(scores, round(self.fraction * len(layers)))
        kept = [layer for i, layer in enumerate(layers) if i not in gone]
        model.model.layers = nn.ModuleList(kept)
        for index, layer in enumerate(kept):  # caches are indexed by position in the stack
            layer.self_attn.layer_idx = index
        config = model.config
        if getattr(config, "layer_types", None):
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in gone]
        config.num_hidden_layers = len(kept)
        return [f"model.layers.{i}" for i in sorted(gone)]

    def _layer_score(self, index: int, layer, stats: dict[str, InputStats]) -> torch.Tensor:
        """How much the layer adds to the residual stream: E||o_proj x||^2 + E||down_proj x||^2."""
        total = torch.zeros((), dtype=torch.float64)
        for linear, leaf in ((layer.self_attn.o_proj, "self_attn.o_proj"), (layer.mlp.down_proj, "mlp.down_proj")):
            weight = linear.weight.double()
            if self.score == "activation":
                total += torch.einsum("oi,ij,oj->", weight, stats[f"model.layers.{index}.{leaf}"].hessian.double(),
                                      weight)
            else:
                total += weight.square().sum()
        return total
