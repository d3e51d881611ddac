"""After the trials: the chosen recipe compressed into the model store, and front recipes reapplied as
`python -m jobs.compress` would, each checked to give its trial's perplexity to 4 significant digits."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml

from cluster.store import Store
from jobs.compress.pipeline import compress_model
from jobs.compress.recipe import Recipe
from jobs.eval.perplexity import perplexity
from jobs.models.load import load_causal_lm, model_dir, open_model
from jobs.search.config import SearchConfig


def reproduce(config: SearchConfig, row: dict, out: str, tokens: torch.Tensor, store: Store) -> dict:
    """Compress `row`'s recipe into `out` (a store name or a path) and measure it again."""
    recipe = Recipe.model_validate(yaml.safe_load(row["recipe_yaml"]))
    uri = compress_model(config.model, recipe, out, store, force=True)
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))  # the trial's reductions
    again = perplexity(load_causal_lm(model_dir(uri, store)), tokens, config.eval.window, config.eval.batch_size).ppl
    same = f"{again:.4g}" == f"{row['ppl']:.4g}"
    if not same:
        print(f"warning: {recipe.name} reapplied measures ppl {again:.6g}, its trial {row['ppl']:.6g}")
    return {"recipe_name": recipe.name, "trial_ppl": row["ppl"], "reapplied_ppl": again, "same_to_4_digits": same}


def store_chosen(config: SearchConfig, chosen: dict, tokens: torch.Tensor, store: Store) -> tuple[str, dict]:
    """The chosen recipe's checkpoint as the stored model `<model>.<recipe>`, and its reproduction."""
    name = f"{open_model(config.model, store).name}.{chosen['recipe_name']}"
    return name, reproduce(config, chosen, name, tokens, store)


def verify_front(config: SearchConfig, front: list[dict], tokens: torch.Tensor, store: Store) -> list[dict]:
    """Every other front recipe reapplied into a scratch folder (the chosen one is checked as stored)."""
    checks = []
    with tempfile.TemporaryDirectory(prefix="rayfoundry-verify-") as tmp:
        for i, row in enumerate(front):
            if row["recipe_yaml"]:
                checks.append(reproduce(config, row, str(Path(tmp) / f"front-{i}"), tokens, store))
    return checks
