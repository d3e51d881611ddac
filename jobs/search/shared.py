"""Work every trial shares, done once before them: the calibration statistics of the original
model for every layer and kind the space can ask for, kept in the store's cache (so a later search,
or `python -m jobs.compress` of a trial's recipe, reuses them).

They are collected by parallel Ray tasks, each over every calibration batch for a share of the
layers: a layer's statistics are then exactly those of one pass over the whole model (splitting the
batches instead would regroup the float sums), which a recipe reapplied alone collects again."""
from __future__ import annotations

import math

import ray
import torch

from cluster.store import Store
from jobs.compress.calibration import InputStats, collect, stats_from_tensors, stats_to_tensors, token_batches
from jobs.compress.pipeline import calibration_dataset, read_calibration_tokens
from jobs.compress.recipe import Recipe, stats_to_collect
from jobs.compress.stats_cache import KIND, ensure_stored, load_stats
from jobs.models.load import load_causal_lm, model_dir, open_model
from jobs.search.config import SearchConfig
from jobs.search.space import ModuleGroup


def kinds_needed(config: SearchConfig) -> frozenset[str]:
    space = config.space
    kinds = set()
    if "gptq" in space.quant_method and any(b is not None for b in space.bits + space.head_bits):
        kinds.add("hessian")
    if "wanda" in space.prune_method and space.sparsity.high > 0:
        kinds.add("sq_norm")
    return frozenset(kinds)


def layers_of(groups: list[ModuleGroup]) -> list[str]:
    return sorted(name for g in groups for name in g.in_features)


def ensure_statistics(config: SearchConfig, groups: list[ModuleGroup], store: Store) -> str | None:
    """The cache entry holding the statistics, collected (once per model, data and settings) if absent."""
    kinds = kinds_needed(config)
    if not kinds:
        return None
    source, calibration = open_model(config.model, store), config.calibration
    dataset = calibration_dataset(calibration, config.model, model_dir(config.model, store), store)
    layers = layers_of(groups)
    name, _ = ensure_stored(store, source, dataset, calibration, kinds, layers,
                            lambda: collect_in_parallel(config, kinds, layers, store))
    return name


def collect_in_parallel(config: SearchConfig, kinds: frozenset[str], layers: list[str],
                        store: Store) -> dict[str, InputStats]:
    cpus = config.resources_per_trial.cpu
    shares = max(1, min(len(layers), math.floor(ray.cluster_resources().get("CPU", cpus) / cpus)))
    tasks = [collect_share.options(num_cpus=cpus).remote(config, layers[i::shares], kinds, store.uri)
             for i in range(shares)]
    print(f"calibration statistics: {len(layers)} layers in {shares} parallel task(s)", flush=True)
    stats: dict[str, InputStats] = {}
    for tensors in ray.get(tasks):
        stats |= stats_from_tensors(tensors)
    return stats


@ray.remote
def collect_share(config: SearchConfig, layers: list[str], kinds: frozenset[str],
                  store_uri: str) -> dict[str, torch.Tensor]:
    """One pass over every calibration batch, hooking only `layers`; flat tensors travel cheaply."""
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))
    store, calibration = Store(store_uri), config.calibration
    path = model_dir(config.model, store)
    model = load_causal_lm(path)
    tokens = read_calibration_tokens(calibration_dataset(calibration, config.model, path, store), calibration)
    modules = {name: model.get_submodule(name) for name in layers}
    stats = collect(model, modules, kinds, token_batches(tokens, calibration), calibration.max_samples, progress=False)
    return stats_to_tensors(stats)


def load_statistics(store_uri: str, entry: str | None, model: torch.nn.Module,
                    recipe: Recipe) -> dict[str, InputStats] | None:
    """The cached statistics of the layers `recipe` calibrates (all of them would be ~0.5 GB on SmolLM2)."""
    if entry is None or recipe.calibration is None:
        return None
    return load_stats(Store(store_uri).get(KIND, entry), stats_to_collect(model, recipe)[1])
