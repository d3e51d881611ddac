"""Compress a stored model with a recipe into a new stored model: the work behind
`python -m jobs.compress`, reusable by jobs that compare or search recipes."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from cluster.errors import UserError
from cluster.store import Store, has_scheme, put_location
from jobs.compress.calibration import CalibrationConfig
from jobs.compress.checkpoint import save_compressed
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.data.prepared import check_tokenized_for, open_dataset
from jobs.data.shards import read_tokens
from jobs.models.load import load_causal_lm, model_dir


def calibration_tokens(recipe: Recipe, model: str, model_path: Path, store: Store) -> torch.Tensor | None:
    """The recipe's calibration tokens for `model` (as the user named it, found at `model_path`)."""
    return None if recipe.calibration is None else tokens_for(recipe.calibration, model, model_path, store)


def tokens_for(cal: CalibrationConfig, model: str, model_path: Path, store: Store) -> torch.Tensor:
    dataset = open_dataset(cal.data, store)
    check_tokenized_for(dataset, model_path, model)
    if cal.split not in dataset.manifest["splits"]:
        raise UserError(f"calibration data '{cal.data}' has no split {cal.split!r}")
    return torch.from_numpy(read_tokens(dataset, cal.split, cal.samples * cal.seq_len).astype("int64"))


def is_location(out: str) -> bool:
    return has_scheme(out) or "/" in out or out.startswith((".", "~"))


def check_out_free(out: str, store: Store, force: bool) -> None:
    """Refuse, before any work, to overwrite an existing result without --force."""
    if force:
        return
    exists = Path(out).expanduser().exists() if is_location(out) and not has_scheme(out) else \
        (not is_location(out) and store.get("models", out) is not None)
    if exists:
        raise UserError(f"{out} already exists; choose another --out or replace it with --force")


def write_result(build, out: str, store: Store, meta: dict, force: bool) -> str:
    """Run `build(folder)` into a temporary folder, then store it under `out`; returns where it went."""
    with tempfile.TemporaryDirectory(prefix="rayfoundry-compress-") as tmp:
        folder = Path(tmp) / "model"
        build(folder)
        if is_location(out):
            return put_location(out, folder, "models", meta, replace=force)
        return store.put_dir("models", out, folder, meta, replace=force).uri


def compress_model(model_ref: str, recipe: Recipe, out: str, store: Store, force: bool = False) -> str:
    """Apply `recipe` to the model and store the checkpoint under `out`; returns its URI."""
    check_out_free(out, store, force)
    path = model_dir(model_ref, store)
    model = load_causal_lm(path)
    try:
        recipe.check(model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    tokens = calibration_tokens(recipe, model_ref, path, store)
    started = time.perf_counter()
    report = apply_recipe(model, recipe, tokens)
    print(f"compressed in {time.perf_counter() - started:.1f}s: " + json.dumps(report))
    recipe_data = recipe.model_dump(mode="json")
    meta = {"source": model_ref, "format": "compressed", "recipe": recipe_data}
    return write_result(lambda folder: save_compressed(model, folder, path, recipe_data, report),
                        out, store, meta, force)
