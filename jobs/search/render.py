"""From a point of the space to an ordinary recipe, and from a uniform recipe back to a point.

A rendered recipe has at most one step per method, in a fixed order (svd, prune, quantize), each
over the groups that use it; settings that differ between groups are `overrides`, each carrying
every field it sets (a layer takes only its last matching override, so they must not stack). The
rules that make a point a recipe are all here:
- a float group (bits null) with lowrank_energy < 1 is factored by SVD and not pruned, since a
  low-rank layer cannot be pruned or quantized after;
- pruning with pattern 2:4 prunes a group iff its sparsity is at least 0.5; a pruned float group
  stores only its kept weights (`format: sparse`), a pruned group that is then quantized keeps its
  zeros in the dense weight, and GPTQ keeps them zero (`keep_zeros`);
- a group size that does not divide a layer's inputs falls back to the largest power of two below
  it that does (576 inputs and 128 give 64), as the shipped int4 recipes do by hand;
- the head is quantized per output row and never pruned.
Two points that render alike give the same recipe name, so the search measures them once.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

from cluster.errors import UserError
from jobs.compress.calibration import CalibrationConfig
from jobs.compress.recipe import Recipe
from jobs.compress.step import matches
from jobs.search.space import GLOBAL, HEAD, Choices, ModuleGroup, value_at


@dataclass(frozen=True)
class GroupSetting:
    bits: int | None
    group_size: int | None
    sparsity: float


@dataclass(frozen=True)
class Candidate:
    """A point with every knob filled in: what one trial compresses with."""

    groups: dict[str, GroupSetting]
    quant_method: str
    pattern: str
    prune_method: str
    lowrank_energy: float

    @classmethod
    def of(cls, point: dict, found: Choices, groups: list[ModuleGroup]) -> Candidate:
        def knob(group: str, name: str):
            key = (group, name) if (group, name) in found.knobs else (GLOBAL, name)
            return value_at(point, found, key)

        settings = {g.name: GroupSetting(knob(g.name, "bits"), knob(g.name, "group_size"), knob(g.name, "sparsity"))
                    for g in groups if g.name != HEAD}
        if any(g.name == HEAD for g in groups):
            settings[HEAD] = GroupSetting(value_at(point, found, (HEAD, "bits")), None, 0.0)
        return cls(settings, *(value_at(point, found, (GLOBAL, k))
                               for k in ("quant_method", "pattern", "prune_method", "lowrank_energy")))

    def factored(self, group: str) -> bool:
        return group != HEAD and self.groups[group].bits is None and self.lowrank_energy < 1

    def pruned(self, group: str) -> bool:
        sparsity = self.groups[group].sparsity
        if group == HEAD or self.factored(group) or sparsity <= 0:
            return False
        return sparsity >= 0.5 if self.pattern == "2:4" else True


def fitted_group_size(group_size: int | None, in_features: int) -> int | None:
    """The group size itself, or the largest power of two below it that divides the inputs."""
    if group_size is None or in_features % group_size == 0:
        return group_size
    size = 1 << (group_size.bit_length() - 1)
    while size >= 2 and in_features % size:
        size //= 2
    if size < 2:
        raise UserError(f"no group size of 2 or more divides {in_features} inputs; add null to space.group_size")
    return size


def grouped_step(method: dict, settings: dict[str, dict], groups: list[ModuleGroup]) -> dict:
    """One step over the layers in `settings` (layer -> its fields): the commonest fields at the step
    level, the others as overrides, one per group or, where a group's layers differ, per layer name."""
    key = lambda fields: json.dumps(fields, sort_keys=True)  # noqa: E731
    common = json.loads(Counter(key(f) for f in settings.values()).most_common(1)[0][0])
    modules, overrides = [], []
    for group in groups:
        layers = {name: f for name, f in settings.items() if name in group.in_features}
        if not layers:
            continue
        modules += group.patterns()
        distinct = {key(f) for f in layers.values()}
        if distinct == {key(common)}:
            continue
        if len(distinct) == 1:
            overrides.append({"modules": group.patterns(), **next(iter(layers.values()))})
            continue
        by_rest: dict[str, dict] = {}
        for name, fields in layers.items():
            if key(fields) != key(common):
                by_rest.setdefault(group.rest_of(name), fields)
        overrides += [{"modules": group.patterns(rest), **fields} for rest, fields in sorted(by_rest.items())]
    step = {**method, **common, "modules": modules}
    return {**step, "overrides": overrides} if overrides else step


def prune_fields(candidate: Candidate, group: str) -> dict:
    fields = {"format": "dense" if candidate.groups[group].bits else "sparse"}
    if candidate.pattern == "2:4":
        return {**fields, "pattern": "2:4"}
    return {**fields, "pattern": "unstructured", "sparsity": candidate.groups[group].sparsity}


def quant_fields(candidate: Candidate, group: ModuleGroup, in_features: int) -> dict:
    setting = candidate.groups[group.name]
    return {"bits": setting.bits, "group_size": fitted_group_size(setting.group_size, in_features)}


def steps_for(candidate: Candidate, groups: list[ModuleGroup]) -> list[dict]:
    steps = []
    factored = [g for g in groups if candidate.factored(g.name)]
    if factored:
        steps.append({"method": "svd", "energy": candidate.lowrank_energy,
                      "modules": [p for g in factored for p in g.patterns()]})
    pruned = {name: prune_fields(candidate, g.name) for g in groups if candidate.pruned(g.name)
              for name in g.in_features}
    if pruned:
        steps.append(grouped_step({"method": candidate.prune_method}, pruned, groups))
    quantized = {name: quant_fields(candidate, g, f) for g in groups if candidate.groups[g.name].bits
                 for name, f in g.in_features.items()}
    if quantized:
        method = {"method": candidate.quant_method}
        if candidate.quant_method == "gptq":
            method |= {"act_order": True, "keep_zeros": any(n in pruned for n in quantized)}
        steps.append(grouped_step(method, quantized, groups))
    return steps


def describe(candidate: Candidate, groups: list[ModuleGroup]) -> str:
    """Each group's widths as rendered: a group size that does not divide a layer's inputs is shown as
    the size that layer gets (`fitted_group_size`), e.g. int4-g64/128 for an MLP of 576 and 1536."""
    inputs = {g.name: set(g.in_features.values()) for g in groups}
    parts = []
    for name, s in candidate.groups.items():
        sizes = sorted({fitted_group_size(s.group_size, f) for f in inputs.get(name, ())} - {None})
        bits = f"int{s.bits}" + (f"-g{'/'.join(map(str, sizes))}" if sizes else "") if s.bits else "float"
        extra = f" {candidate.pattern if candidate.pattern == '2:4' else f'{s.sparsity:g}'} pruned" \
            if candidate.pruned(name) else ""
        parts.append(f"{name} {bits}{' svd' if candidate.factored(name) else ''}{extra}")
    return "; ".join(parts)


def render_recipe(candidate: Candidate, groups: list[ModuleGroup], calibration: CalibrationConfig | None,
                  prefix: str) -> Recipe | None:
    """The recipe a trial applies, named `prefix` plus a hash of its steps; None for a point that
    compresses nothing (every group float, unpruned, unfactored): the uncompressed model."""
    steps = steps_for(candidate, groups)
    if not steps:
        return None
    draft = Recipe.model_validate({"name": "draft", "calibration": calibration, "steps": steps})
    if not any(s.stats_needed() for s in draft.steps):
        draft = draft.model_copy(update={"calibration": None})
    digest = hashlib.sha256(json.dumps(draft.model_dump(mode="json", exclude={"name"}),
                                       sort_keys=True).encode()).hexdigest()[:8]
    return draft.model_copy(update={"name": f"{prefix}-{digest}", "description": describe(candidate, groups)})


def point_from_recipe(recipe: Recipe, found: Choices, groups: list[ModuleGroup]) -> dict:
    """The point whose rendering does what a uniform recipe does, or a UserError saying which of its
    settings the space cannot express. Overrides that set only group sizes are read as the fallback
    rendering applies anyway (`fitted_group_size`)."""
    values: dict[tuple[str, str], object] = {(g.name, "bits"): None for g in groups}
    values |= {(g.name, "sparsity"): 0.0 for g in groups if g.name != HEAD}
    values[(GLOBAL, "lowrank_energy")] = 1.0
    for step in recipe.steps:
        _read_step(step, values, groups, recipe.name)
    point: dict[str, dict] = {}
    for (group, knob), value in values.items():
        key = (group, knob) if (group, knob) in found.knobs else (GLOBAL, knob)
        _check_expressible(recipe.name, key, value, found)
        if key in found.varying():
            point.setdefault(key[0], {})[key[1]] = value
    for group, knob in found.varying():  # knobs the recipe leaves alone: any choice renders alike
        point.setdefault(group, {}).setdefault(knob, found.knobs[(group, knob)][0])
    return point


def _read_step(step, values: dict, groups: list[ModuleGroup], name: str) -> None:
    fields = step.model_dump(exclude={"method", "modules", "exclude", "overrides"})
    if any(set(o.settings()) - {"group_size"} for o in step.overrides):
        raise UserError(f"recipe {name!r} cannot be a seed: its overrides set more than group sizes")
    chosen = [g for g in groups if any(matches(n, step.modules) and not matches(n, step.exclude)
                                       for n in g.in_features)]
    if step.method in ("rtn", "gptq"):
        values[(GLOBAL, "quant_method")] = step.method
        for g in chosen:
            values[(g.name, "bits")] = fields["bits"]
            if g.name != HEAD:
                values[(g.name, "group_size")] = fields["group_size"]
            elif fields["group_size"] is not None:
                raise UserError(f"recipe {name!r} cannot be a seed: the head is quantized per row in this space")
    elif step.method in ("magnitude", "wanda"):
        values[(GLOBAL, "prune_method")] = step.method
        values[(GLOBAL, "pattern")] = fields["pattern"]
        for g in chosen:
            values[(g.name, "sparsity")] = 0.5 if fields["pattern"] == "2:4" else fields["sparsity"]
    elif step.method == "svd" and fields.get("energy") is not None:
        values[(GLOBAL, "lowrank_energy")] = fields["energy"]
    else:
        raise UserError(f"recipe {name!r} cannot be a seed: the space has no {step.method} step like it")


def _check_expressible(name: str, key: tuple[str, str], value, found: Choices) -> None:
    allowed = found.knobs.get(key)
    if allowed is None:
        return
    if key in found.ranges:
        low, high, _ = found.ranges[key]
        ok = low - 1e-9 <= value <= high + 1e-9
    else:
        ok = value in allowed
    if not ok:
        raise UserError(f"recipe {name!r} cannot be expressed in this space: {key[1]} {value} "
                        f"is not among {allowed if key not in found.ranges else found.ranges[key][:2]}")
