"""Compress a stored model with a recipe into a new stored model: the work behind
`python -m jobs.compress`, reusable by jobs that compare or search recipes."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from cluster.errors import UserError
from cluster.store import Artifact, Store, has_scheme, materialize, put_location
from jobs.compress.calibration import CalibrationConfig, InputStats
from jobs.compress.checkpoint import save_compressed
from jobs.compress.recipe import Recipe, apply_recipe, collect_original, stats_to_collect
from jobs.compress.stats_cache import load_or_collect
from jobs.data.prepared import check_tokenized_for, open_dataset
from jobs.data.shards import read_tokens
from jobs.models.load import load_causal_lm, open_model


def calibration_dataset(calibration: CalibrationConfig, model: str, model_path: Path, store: Store) -> Artifact:
    """The calibration dataset, checked to be tokenized for `model` (as the user named it, found at
    `model_path`) and to have the split."""
    dataset = open_dataset(calibration.data, store)
    check_tokenized_for(dataset, model_path, model)
    if calibration.split not in dataset.manifest["splits"]:
        raise UserError(f"calibration data '{calibration.data}' has no split {calibration.split!r}")
    return dataset


def read_calibration_tokens(dataset: Artifact, calibration: CalibrationConfig) -> torch.Tensor:
    needed = calibration.samples * calibration.seq_len
    return torch.from_numpy(read_tokens(dataset, calibration.split, needed).astype("int64"))


def calibration_tokens(recipe: Recipe, model: str, model_path: Path, store: Store) -> torch.Tensor | None:
    """The recipe's calibration tokens for `model` (as the user named it, found at `model_path`)."""
    if recipe.calibration is None:
        return None
    return read_calibration_tokens(calibration_dataset(recipe.calibration, model, model_path, store),
                                   recipe.calibration)


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
    source = open_model(model_ref, store)
    path = materialize(source)
    model = load_causal_lm(path)
    try:
        recipe.check(model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dataset = None if recipe.calibration is None else calibration_dataset(recipe.calibration, model_ref, path, store)
    tokens = None if dataset is None else read_calibration_tokens(dataset, recipe.calibration)
    started = time.perf_counter()
    stats = original_stats(model, recipe, tokens, source, dataset, store) if recipe.uses_original_stats() else None
    report = apply_recipe(model, recipe, tokens, stats=stats)
    print(f"compressed in {time.perf_counter() - started:.1f}s: " + json.dumps(report))
    recipe_data = recipe.model_dump(mode="json")
    meta = {"source": model_ref, "format": "compressed", "recipe": recipe_data}
    return write_result(lambda folder: save_compressed(model, folder, path, recipe_data, report),
                        out, store, meta, force)


def original_stats(model: torch.nn.Module, recipe: Recipe, tokens: torch.Tensor, source: Artifact,
                   dataset: Artifact, store: Store) -> dict[str, InputStats]:
    """Statistics of the untouched model for every step of the recipe, from the store's cache, so a
    recipe repeated (or another tried on the same model and data) compresses from the same numbers."""
    kinds, layers = stats_to_collect(model, recipe)
    if not kinds:
        return {}
    return load_or_collect(store, source, dataset, recipe.calibration, kinds, layers,
                           lambda: collect_original(model, recipe, tokens, kinds, layers))
