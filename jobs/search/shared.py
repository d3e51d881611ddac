"""Work every trial shares, done once before them: the calibration statistics of the original
model for every layer and kind the space can ask for, kept in the store's cache (so a later search,
or `python -m jobs.compress` of a trial's recipe, reuses them)."""
from __future__ import annotations

import ray
import torch

from cluster.store import Store
from jobs.compress.calibration import InputStats, collect, token_batches
from jobs.compress.pipeline import calibration_dataset, read_calibration_tokens
from jobs.compress.stats_cache import KIND, entry_for, load_or_collect, load_stats
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


@ray.remote
def ensure_statistics(config: SearchConfig, groups: list[ModuleGroup], store_uri: str) -> str | None:
    """The cache entry holding the statistics, collected (once per model, data and settings) if absent."""
    kinds = kinds_needed(config)
    if not kinds:
        return None
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))
    store = Store(store_uri)
    source, path = open_model(config.model, store), model_dir(config.model, store)
    calibration = config.calibration
    dataset = calibration_dataset(calibration, config.model, path, store)
    layers = layers_of(groups)

    def collect_all() -> dict[str, InputStats]:
        model = load_causal_lm(path)
        batches = token_batches(read_calibration_tokens(dataset, calibration), calibration)
        modules = {name: model.get_submodule(name) for name in layers}
        return collect(model, modules, kinds, batches, calibration.max_samples, progress=False)

    load_or_collect(store, source, dataset, calibration, kinds, layers, collect_all)
    return entry_for(source, dataset, calibration, kinds, layers)[0]


def load_statistics(store_uri: str, entry: str | None) -> dict[str, InputStats] | None:
    if entry is None:
        return None
    return load_stats(Store(store_uri).get(KIND, entry))

