"""The search space over a model: its module groups, and the Tune domains drawn for each.

A group is the attention or the MLP linears of a contiguous bucket of decoder layers, or the head.
A point (what Tune hands a trial) is nested as `{group: {knob: value}, "all": {knob: value}}`; only
knobs with two or more choices are in it, the rest take the space's one choice (`Candidate.of`).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from ray import tune
from torch import nn

from cluster.errors import UserError
from jobs.search.config import Range, SpaceConfig

LAYER_NAME = re.compile(r"^(?P<prefix>.*\.layers\.)(?P<index>\d+)\.(?P<part>self_attn|mlp)\.(?P<rest>.+)$")
PARTS = {"self_attn": "attn", "mlp": "mlp"}
HEAD = "head"
GLOBAL = "all"
GLOBAL_KNOBS = ("quant_method", "pattern", "prune_method", "lowrank_energy")


@dataclass(frozen=True)
class ModuleGroup:
    name: str  # attn0, mlp1, ..., head
    prefix: str  # `model.layers.` (what precedes the layer index); empty for the head
    part: str  # self_attn | mlp | "" for the head
    indices: tuple[int, ...]
    in_features: dict[str, int]  # every linear of the group by name

    def patterns(self, rest: str = "*") -> list[str]:
        """fnmatch patterns of this group's linears (or of those named `.<rest>` in each layer)."""
        if self.name == HEAD:
            return sorted(self.in_features)
        return [f"{self.prefix}{digits}.{self.part}.{rest}" for digits in index_patterns(self.indices)]

    def rest_of(self, layer: str) -> str:
        return LAYER_NAME.match(layer)["rest"]


def index_patterns(indices: tuple[int, ...]) -> list[str]:
    """fnmatch patterns for a run of layer indices, one per tens: (8..13) -> ["[8-9]", "1[0-3]"]."""
    patterns = []
    for tens, run in itertools.groupby(indices, key=lambda i: i // 10):
        digits = [i % 10 for i in run]
        head = str(tens) if tens else ""
        last = f"[{digits[0]}-{digits[-1]}]" if len(digits) > 1 else str(digits[0])
        patterns.append(head + last)
    return patterns


def module_groups(model: nn.Module, depth_buckets: int) -> list[ModuleGroup]:
    """Attention and MLP groups per depth bucket, then the head; every linear belongs to exactly one."""
    by_layer: dict[tuple[str, str, int], dict[str, int]] = {}
    head: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if match := LAYER_NAME.match(name):
            key = (match["prefix"], match["part"], int(match["index"]))
            by_layer.setdefault(key, {})[name] = module.in_features
        elif name.endswith("lm_head"):
            head[name] = module.in_features
        else:
            raise UserError(f"linear {name!r} is neither in a decoder layer's attention or MLP nor the head")
    depth = 1 + max(index for _, _, index in by_layer)
    if depth_buckets > depth:
        raise UserError(f"space.depth_buckets is {depth_buckets} but the model has {depth} layers")
    groups = []
    for bucket, indices in enumerate(split_evenly(range(depth), depth_buckets)):
        for part, short in PARTS.items():
            keys = [k for k in by_layer if k[1] == part and k[2] in indices]
            if keys:
                layers = {n: f for k in keys for n, f in by_layer[k].items()}
                groups.append(ModuleGroup(f"{short}{bucket}", keys[0][0], part, tuple(indices), layers))
    if head:
        groups.append(ModuleGroup(HEAD, "", "", (), head))
    return groups


def split_evenly(items: range, parts: int) -> list[list[int]]:
    """Contiguous runs of near-equal length, the longer ones first."""
    base, extra = divmod(len(items), parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + base + (p < extra))
    return [list(items[a:b]) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class Choices:
    """Every knob's choices, by the key it has in a point: (group or "all", knob)."""

    knobs: dict[tuple[str, str], list]
    ranges: dict[tuple[str, str], tuple[float, float, float]]  # (low, high, step) of the continuous ones

    def varying(self) -> list[tuple[str, str]]:
        return [k for k, values in self.knobs.items() if len(values) > 1]

    def size(self) -> int:
        return math.prod(len(v) for v in self.knobs.values())


def choices(space: SpaceConfig, groups: list[ModuleGroup]) -> Choices:
    knobs, ranges = {}, {}
    for knob in ("bits", "group_size", "sparsity"):
        keys = [(g.name, knob) for g in groups if g.name != HEAD] if knob in space.per_group else [(GLOBAL, knob)]
        for key in keys:
            knobs[key] = _values(space, knob)
    if any(g.name == HEAD for g in groups):
        knobs[(HEAD, "bits")] = list(space.head_bits)
    for knob in GLOBAL_KNOBS:
        knobs[(GLOBAL, knob)] = _values(space, knob)
    for key in knobs:  # a knob no point can use is not searched (nor does it multiply a grid)
        if not _matters(space, key):
            knobs[key] = knobs[key][:1]
    for key in knobs:
        field = getattr(space, key[1] if key[0] != HEAD else "head_bits")
        if isinstance(field, Range) and field.low < field.high:
            ranges[key] = (field.low, field.high, field.step)
    return Choices(knobs, ranges)


def _matters(space: SpaceConfig, key: tuple[str, str]) -> bool:
    decoder_quantized = any(b is not None for b in space.bits)
    if key[1] == "group_size":  # the head takes one scale per row
        return decoder_quantized
    if key[1] == "quant_method":
        return decoder_quantized or any(b is not None for b in space.head_bits)
    if key[1] in ("pattern", "prune_method"):
        return space.sparsity.high > 0
    return True


def _values(space: SpaceConfig, knob: str) -> list:
    field = getattr(space, knob)
    return field.values() if isinstance(field, Range) else list(field)


def check_searchable(found: Choices) -> None:
    if not found.varying():
        raise UserError("the space holds one recipe; give some knob two or more choices")


def param_space(found: Choices) -> dict:
    """Tune domains for the knobs that vary, nested by group."""
    space: dict[str, dict] = {}
    for key in found.varying():
        if key in found.ranges:
            low, high, step = found.ranges[key]
            domain = tune.quniform(low, high, step)
        else:
            domain = tune.choice(found.knobs[key])
        space.setdefault(key[0], {})[key[1]] = domain
    return space


def grid_space(found: Choices) -> dict:
    """Every combination of the varying knobs' values (a range gives its steps)."""
    space: dict[str, dict] = {}
    for key in found.varying():
        space.setdefault(key[0], {})[key[1]] = tune.grid_search(found.knobs[key])
    return space


def grid_size(found: Choices) -> int:
    return math.prod(len(found.knobs[k]) for k in found.varying())


def value_at(point: dict, found: Choices, key: tuple[str, str]):
    """The point's value for a knob, or the knob's one choice when it does not vary."""
    if key in found.varying():
        value = point[key[0]][key[1]]
        return round(value, 6) if isinstance(value, float) else value
    return found.knobs[key][0]
