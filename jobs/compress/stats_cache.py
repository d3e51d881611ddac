"""Calibration statistics of an original model, kept in the store for reuse.

Collecting statistics is most of the time a calibrated recipe takes, and with `stats_from: original`
they depend only on the model and the data, not on the recipe's steps. So they are collected once,
stored as the artifact `cache/calib-<model>-<key16>` (one `stats.safetensors`), and every later
recipe on the same model and data reads them: each trial of a search, and `python -m jobs.compress`
repeating a trial, which then compresses from the very same numbers, bit for bit.

The key is the sha256 of a canonical JSON of everything the numbers depend on:
- the model: sha256 of its config.json, compression.json and weight files
- the data: sha256 of the calibration split's shards, and the split's name
- the calibration settings that shape the batches (samples, seq_len, batch_size, max_samples); not
  how the dataset was named (a store name and a path to the same shards are the same data) nor
  `stats_from`, which only says whether this cache is used
- the kinds of statistics and the layers, and FORMAT_VERSION, raised whenever the stored form or
  the way statistics are computed changes

An entry collected for more kinds and layers of the same model, data and settings serves too (a
search stores every layer its space can touch; a recipe it found, reapplied, needs some of them).
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cluster.errors import UserError
from cluster.store import Artifact, Store, list_files, materialize, sha256_of
from jobs.compress.calibration import CalibrationConfig, InputStats, stats_from_tensors, stats_to_tensors

KIND = "cache"
STATS_FILE = "stats.safetensors"
FORMAT_VERSION = 1
MODEL_FILES = ("config.json", "compression.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# What the key leaves out of CalibrationConfig (see the module docstring).
NOT_IN_KEY = {"data", "split", "stats_from"}


def file_hashes(artifact: Artifact, relatives: Iterable[str]) -> dict[str, str]:
    """sha256 of each file: from the artifact's manifest when it has one (opening the artifact
    checked its files against it), else read now."""
    files = (artifact.manifest or {}).get("files", {})
    return {rel: files[rel]["sha256"] if rel in files else sha256_of(artifact.fs, artifact.file_path(rel))
            for rel in sorted(relatives)}


def model_identity(model: Artifact) -> dict[str, str]:
    """The files that decide what the model computes, with their sha256."""
    return file_hashes(model, [rel for rel in _files_of(model) if _decides_the_model(rel)])


def _decides_the_model(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES)


def _files_of(artifact: Artifact) -> list[str]:
    return list(artifact.manifest["files"]) if artifact.manifest is not None else list_files(artifact.fs, artifact.path)


def data_identity(dataset: Artifact, split: str) -> dict:
    """The calibration split's name and the sha256 of its shards, in stream order."""
    shards = [shard["file"] for shard in dataset.manifest["splits"][split]["shards"]]
    hashes = file_hashes(dataset, shards)
    return {"split": split, "shards": [hashes[rel] for rel in shards]}


def cache_key(model: dict[str, str], data: dict, calibration: CalibrationConfig, kinds: Iterable[str],
              layers: Iterable[str]) -> str:
    """sha256 (hex) of the canonical JSON of everything the statistics depend on."""
    identity = {"format": FORMAT_VERSION, "model": model, "data": data,
                "calibration": calibration.model_dump(mode="json", exclude=NOT_IN_KEY),
                "kinds": sorted(kinds), "layers": sorted(layers)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry_name(model_name: str, key: str, prefix: str = "calib") -> str:
    """The artifact's name: readable model part (a store name allows letters, digits, '.', '_', '-')."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip(".-") or "model"
    return f"{prefix}-{readable}-{key[:16]}"


def load_stats(artifact: Artifact, layers: Iterable[str] | None = None) -> dict[str, InputStats]:
    """Every layer's statistics, or only those of `layers` (read alone from the file)."""
    path = materialize(artifact) / STATS_FILE
    if layers is None:
        return stats_from_tensors(load_file(path))
    wanted = set(layers)
    with safe_open(path, framework="pt") as f:
        return stats_from_tensors({k: f.get_tensor(k) for k in f.keys() if k.rpartition("/")[0] in wanted})


def store_stats(store: Store, name: str, stats: dict[str, InputStats], meta: dict) -> None:
    """Write the statistics as artifact `name`. Another process that stored the same key meanwhile
    stored the same numbers, so losing that race is not an error."""
    with tempfile.TemporaryDirectory(prefix="rayfoundry-calib-") as tmp:
        save_file(stats_to_tensors(stats), Path(tmp) / STATS_FILE)
        try:
            store.put_dir(KIND, name, Path(tmp), meta)
        except UserError:
            if store.get(KIND, name) is None:
                raise


def ensure_stored(store: Store, model: Artifact, dataset: Artifact, calibration: CalibrationConfig,
                  kinds: Iterable[str], layers: Iterable[str],
                  collect: Callable[[], dict[str, InputStats]]) -> tuple[str, dict[str, InputStats] | None]:
    """The artifact name of statistics for this model, data, settings, kinds and layers: stored for
    exactly these, or for more kinds and layers of the same model, data and settings (a search's, say);
    when none is, `collect()` makes them, they are stored for next time and returned too (else None:
    a caller that only passes the name on need not read them)."""
    kinds, layers = sorted(kinds), sorted(layers)
    identity = (model_identity(model), data_identity(dataset, calibration.split))
    key, source = cache_key(*identity, calibration, kinds, layers), cache_key(*identity, calibration, [], [])
    name = entry_name(model.name, key)
    if (cached := store.get(KIND, name)) is not None and cached.manifest.get("key") == key:
        print(f"calibration statistics: reusing stored {KIND} '{name}'")
        return name, None
    if (covering := covering_entry(store, source, kinds, layers)) is not None:
        print(f"calibration statistics: reusing stored {KIND} '{covering.name}', which covers these layers")
        return covering.name, None
    stats = collect()
    meta = {"source": model.name, "format": "calibration-stats", "key": key, "data": dataset.name,
            "split": calibration.split, "kinds": kinds, "num_layers": len(layers), "source_key": source,
            "layers": layers, "recreate": f"rayfoundry cache rm {name}; the next compression collects it again"}
    store_stats(store, name, stats, meta)
    print(f"calibration statistics: collected and stored as {KIND} '{name}'")
    return name, stats


def covering_entry(store: Store, source: str, kinds: list[str], layers: list[str]) -> Artifact | None:
    """A stored entry of the same model, data and settings (`source`) with every kind and layer asked for;
    each layer's numbers do not depend on which other layers were collected with it."""
    for artifact in store.list(KIND):
        meta = artifact.manifest
        if meta.get("source_key") == source and set(kinds) <= set(meta["kinds"]) and set(layers) <= set(meta["layers"]):
            return artifact
    return None


def load_or_collect(store: Store, model: Artifact, dataset: Artifact, calibration: CalibrationConfig,
                    kinds: Iterable[str], layers: Iterable[str],
                    collect: Callable[[], dict[str, InputStats]]) -> dict[str, InputStats]:
    """The statistics themselves, stored or collected (see ensure_stored)."""
    name, stats = ensure_stored(store, model, dataset, calibration, kinds, layers, collect)
    return stats if stats is not None else load_stats(store.get(KIND, name), layers)
