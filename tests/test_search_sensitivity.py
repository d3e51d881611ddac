"""Sensitivity seeds without Ray: which probes a space asks for, the point each probe renders to, and
the exact choice of widths within a share of the budget (the table a search measures is checked in
test_search_job.py, on a real cluster)."""
from __future__ import annotations

import itertools
import math
import random

from jobs.models.load import load_causal_lm
from jobs.search.config import SearchConfig
from jobs.search.render import Candidate, render_recipe
from jobs.search.sensitivity import COST_BINS, Probe, cheapest_within, mixed_seeds, point_for, probes_for
from jobs.search.space import choices, module_groups

SPACE = {"bits": [2, 4, 8, None], "group_size": [32, 64, 128, None], "quant_method": ["rtn", "gptq"],
         "per_group": ["bits", "group_size", "sparsity"], "sparsity": {"low": 0, "high": 0.5, "step": 0.25},
         "lowrank_energy": {"low": 0.9, "high": 1.0, "step": 0.1}, "head_bits": [8, None]}


def config(**seeds) -> SearchConfig:
    return SearchConfig.model_validate({
        "name": "s", "model": "m", "budget": {"max_ppl_increase": 0.05}, "num_trials": 4, "space": SPACE,
        "calibration": {"data": "d"}, "seeds": {"sensitivity": seeds}})


def test_probes_cover_every_group_width_and_group_size(tiny_llama_dir):
    groups = module_groups(load_causal_lm(tiny_llama_dir), 2)
    found = choices(config().space, groups)
    probes = probes_for(config(), found, groups)
    assert Probe("attn0", 8, None, "gptq") in probes  # 8 bits per row: what int8-weight does
    assert {(p.bits, p.group_size) for p in probes if p.group == "mlp1"} == {(8, None), (4, 128), (4, 64), (4, 32),
                                                                             (2, 128), (2, 64), (2, 32)}
    assert [p for p in probes if p.group == "head"] == [Probe("head", 8, None, "gptq")]
    narrowed = probes_for(config(bits=[4]), found, groups)
    assert {p.bits for p in narrowed} == {4} and not [p for p in narrowed if p.group == "head"]


def test_a_probe_quantizes_its_group_alone(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir)
    groups = module_groups(model, 2)
    found = choices(config().space, groups)
    point = point_for(found, {"mlp1": (4, 32)}, "gptq")
    recipe = render_recipe(Candidate.of(point, found, groups), groups, config().calibration, "p")
    (step,) = recipe.steps
    mlp1 = next(g for g in groups if g.name == "mlp1")
    assert step.method == "gptq" and (step.bits, step.group_size) == (4, 32) and not step.overrides
    assert set(step.targets(model)) == set(mlp1.in_features)


def brute_force(rows: list[dict], budget: float) -> float:
    by_group = {}
    for row in rows:
        by_group.setdefault(row["group"], [None]).append(row)
    best = 0.0
    for picks in itertools.product(*by_group.values()):
        chosen = [r for r in picks if r]
        if sum(max(r["log_ratio"], 0) for r in chosen) <= budget + 1e-12:
            best = max(best, sum(r["bytes_saved"] for r in chosen))
    return best


def test_the_chosen_widths_are_the_best_within_the_share_of_the_budget():
    rng = random.Random(0)
    budget = math.log(1.05)
    unit = budget / COST_BINS
    for _ in range(50):  # costs on the rounding grid, so the exact answer is brute force's
        rows = [{"group": f"g{g}", "bits": b, "bytes_saved": rng.randint(1, 100),
                 "log_ratio": unit * rng.randint(-50, 900)} for g in range(4) for b in (2, 4, 8)]
        picks = cheapest_within(rows, budget)
        assert sum(max(r["log_ratio"], 0) for r in picks.values()) <= budget + 1e-12
        assert sum(r["bytes_saved"] for r in picks.values()) == brute_force(rows, budget)
    assert cheapest_within(rows, 0.0) == {}


def test_a_seed_per_share_and_none_when_nothing_fits(tiny_llama_dir):
    groups = module_groups(load_causal_lm(tiny_llama_dir), 2)
    found = choices(config().space, groups)
    row = lambda group, bits, size, change, saved: {  # noqa: E731
        "group": group, "bits": bits, "group_size": size, "method": "gptq", "log_ratio": math.log1p(change),
        "bytes_saved": saved}
    rows = [row("attn0", 8, None, 0.001, 10), row("attn0", 4, 32, 0.03, 15), row("mlp0", 8, None, 0.002, 30),
            row("mlp0", 4, 32, 0.06, 45), row("head", 8, None, 0.2, 100)]
    seeds = mixed_seeds(rows, [0.5, 1.0], 1.05, found)
    assert [name for name, _, _ in seeds] == ["sensitivity-0.5", "sensitivity-1"]
    half, full = ({g: (r["bits"], r["group_size"]) for g, r in picks.items()} for _, _, picks in seeds)
    assert half == {"attn0": (8, None), "mlp0": (8, None)}  # +0.3 %; int4 attention (+3 %) exceeds 2.5 %
    assert full == {"attn0": (4, 32), "mlp0": (8, None)}  # +3.2 % within 5 %; the head's +20 % never fits
    assert seeds[1][1]["attn0"] == {"bits": 4, "group_size": 32, "sparsity": 0.0}
    assert mixed_seeds([row("head", 8, None, 0.2, 100)], [1.0], 1.05, found) == []
