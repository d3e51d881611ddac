"""The speed floor checked by measurement rather than by each trial's one figure.

Trials measure decode tok/s once each, minutes apart; on a shared machine one figure can be off by a
third. So with `choose.min_decode_b1_vs`, the candidates within budget whose trial figure is within
`TOLERANCE` of the reference's are taken smallest first, and each is measured against the reference
(that seed recipe, or the float model) in turns, ROUNDS times each, in one Ray task on one node: the
first whose median is at least the reference's median is chosen; when none is, the reference recipe
itself (if within budget).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import ray
import torch
import yaml

from cluster.store import Store
from jobs.bench.decode import decode_rates
from jobs.compress.pipeline import compress_model
from jobs.compress.recipe import Recipe
from jobs.models.load import model_dir
from jobs.search.config import SearchConfig
from jobs.search.front import choose, cost

ROUNDS = 3
TOLERANCE = 0.2


def reference_row(config: SearchConfig, rows: list[dict], baseline: dict) -> dict | None:
    name = config.choose.min_decode_b1_vs
    if name == "fp32":
        return baseline
    return next((r for r in rows if r["seed_name"] == name and r["status"] == "complete" and r.get("decode_b1")),
                None)


def candidates(config: SearchConfig, rows: list[dict], limit: float, reference: dict) -> list[dict]:
    """Within budget, near the reference's trial speed or above, smallest first (ties: faster first)."""
    floor = (1 - TOLERANCE) * reference["decode_b1"]
    fits = [r for r in rows if r["recipe_yaml"] and r["status"] == "complete" and r["ppl"] <= limit
            and (r.get("decode_b1") or 0) >= floor]
    unique: dict[str, dict] = {}
    for row in fits:  # a recipe two points rendered alike is one candidate
        unique.setdefault(row["recipe_name"], row)
    return sorted(unique.values(), key=lambda r: (cost(r, config.choose.minimize), -r["decode_b1"]))


def choose_confirmed(config: SearchConfig, rows: list[dict], baseline: dict, limit: float,
                     store: Store) -> tuple[dict | None, list[dict]]:
    """(the chosen row or None, one record per candidate measured against the reference)."""
    recipes = [r for r in rows if r["recipe_yaml"]]  # the uncompressed model is a reference, not a choice
    if config.choose.min_decode_b1_vs is None:
        return choose(recipes, limit, config.choose.minimize, None), []
    reference = reference_row(config, rows, baseline)
    if reference is None:
        print(f"warning: {config.choose.min_decode_b1_vs} has no decode speed (it failed or was not measured); "
              "the chosen recipe is not held to it")
        return choose(recipes, limit, config.choose.minimize, None), []
    if config.choose.confirm == 0:
        return choose(recipes, limit, config.choose.minimize, reference["decode_b1"]), []
    checks = []
    for row in candidates(config, rows, limit, reference)[:config.choose.confirm]:
        if row["recipe_name"] == reference.get("recipe_name"):
            return row, checks  # as fast as itself
        check = ray.get(measure_in_turns.options(num_cpus=config.resources_per_trial.cpu).remote(
            config, row["recipe_yaml"], reference.get("recipe_yaml"), store.uri))
        checks.append({"recipe_name": row["recipe_name"], "reference": config.choose.min_decode_b1_vs, **check})
        verdict = "as fast" if check["passed"] else "slower"
        print(f"speed check: {row['recipe_name']} {check['decode_b1']:.1f} tok/s vs "
              f"{config.choose.min_decode_b1_vs} {check['reference_decode_b1']:.1f} (medians of {ROUNDS}): {verdict}",
              flush=True)
        if check["passed"]:
            return row, checks
    # None measured as fast: the reference itself, as fast as itself, when it is a recipe within budget.
    fits = reference.get("recipe_yaml") and reference["status"] == "complete" and reference["ppl"] <= limit
    return (reference if fits else None), checks


@ray.remote
def measure_in_turns(config: SearchConfig, recipe_yaml: str, reference_yaml: str | None, store_uri: str) -> dict:
    """Both checkpoints compressed here, then decode tok/s at batch 1 of each in turns."""
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))
    store = Store(store_uri)
    with tempfile.TemporaryDirectory(prefix="rayfoundry-speed-") as tmp:
        folders = [checkpoint(config, recipe_yaml, Path(tmp) / "candidate", store),
                   checkpoint(config, reference_yaml, Path(tmp) / "reference", store)]
        samples: list[list[float]] = [[], []]
        for _ in range(ROUNDS):
            for folder, taken in zip(folders, samples):
                taken.append(decode_rates(folder, config.speed.engine, [1], config.speed.prompt_tokens,
                                          config.speed.max_tokens)[1])
    mine, theirs = (statistics.median(s) for s in samples)
    return {"decode_b1": mine, "reference_decode_b1": theirs, "passed": mine >= theirs,
            "samples": samples[0], "reference_samples": samples[1]}


def checkpoint(config: SearchConfig, recipe_yaml: str | None, out: Path, store: Store) -> Path:
    """The recipe's checkpoint written to `out`; without a recipe, the float model's own folder."""
    if recipe_yaml is None:
        return model_dir(config.model, store)
    recipe = Recipe.model_validate(yaml.safe_load(recipe_yaml))
    return model_dir(compress_model(config.model, recipe, str(out), store, force=True), store)
