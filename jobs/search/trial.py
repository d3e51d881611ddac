"""One trial: render the point's recipe, compress, report perplexity window batch by window batch
(so Tune can stop it early), then, for a trial that ends within budget (or a seed), write its
checkpoint and measure it on our engine. A finished trial is cached in the run's folder under its
recipe's name before its last report, so a resumed search, or a second point that renders alike,
does not compress and measure it again."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from cluster.store import Store, write_bytes_atomic
from jobs.bench.decode import decode_rates
from jobs.compress.checkpoint import save_compressed
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.eval.perplexity import perplexity_stream
from jobs.eval.size import checkpoint_bytes, linear_bytes
from jobs.models.load import load_causal_lm
from jobs.search.config import SearchConfig
from jobs.search.render import Candidate, render_recipe
from jobs.search.searchers import metric_key
from jobs.search.shared import load_statistics
from jobs.search.space import Choices, ModuleGroup


# Tune's progress table shows the first four numbers a trial reports: these lead every report.
TABLE_COLUMNS = ("ppl_ratio", "ppl", "windows_done", "linear_bytes")


@dataclass
class TrialContext:
    """What every trial shares, put in Ray's object store once."""

    config: SearchConfig
    run: str  # Tune's run name; the finished trials' cache is in its folder
    groups: list[ModuleGroup]
    found: Choices
    model_path: str
    store_uri: str
    eval_tokens: torch.Tensor
    stats_entry: str | None  # the store's cache entry of the original model's calibration statistics
    baseline_nll: list[float]  # the uncompressed model's nll after each batch of windows
    limit_ratio: float  # the budget as perplexity over the uncompressed model's
    seeds: dict[str, str]  # recipe name -> seed recipe's name
    baseline: dict  # the uncompressed model's measurements, as a finished trial reports them

    def recipe(self, point: dict) -> Recipe | None:
        candidate = Candidate.of(point, self.found, self.groups)
        return render_recipe(candidate, self.groups, self.config.calibration, self.config.name)


class TrialCache:
    """Finished trials' last reports, one JSON file per recipe in the run's folder of the store."""

    def __init__(self, store_uri: str, run_name: str):
        self.store = Store(store_uri)
        self.root = f"{self.store.root}/runs/{run_name}/rayfoundry-trials"

    def get(self, recipe_name: str) -> dict | None:
        path = f"{self.root}/{recipe_name}.json"
        if self.store.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.store.fs.open_input_stream(path) as f:
            return json.loads(f.readall())

    def put(self, recipe_name: str, row: dict) -> None:
        write_bytes_atomic(self.store.fs, f"{self.root}/{recipe_name}.json", json.dumps(row).encode())

    def count(self) -> int:
        infos = self.store.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sum(i.path.endswith(".json") for i in infos)


def run_name(config: SearchConfig) -> str:
    return f"search-{config.name}"


def run_trial(point: dict, context: TrialContext) -> None:
    """Tune's trainable: compress, report as perplexity comes in, finish with size and speed."""
    config = context.config
    recipe = context.recipe(point)
    if recipe is None:
        tune.report({**context.baseline, "cached": True})
        return
    cache = TrialCache(context.store_uri, context.run)
    if (cached := cache.get(recipe.name)) is not None:
        tune.report({**cached, "cached": True})
        return
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))
    row = {**dict.fromkeys(TABLE_COLUMNS), "recipe_name": recipe.name, "seed_name": context.seeds.get(recipe.name),
           "is_seed": recipe.name in context.seeds, "node_id": ray.get_runtime_context().get_node_id(),
           "measured_by_pid": os.getpid(), "cached": False, **{metric_key(o): None for o in config.objectives}}
    model = load_causal_lm(Path(context.model_path))
    started = time.perf_counter()
    stats = load_statistics(context.store_uri, context.stats_entry, model, recipe)
    steps = apply_recipe(model, recipe, None, progress=False, stats=stats)
    row |= {"compress_s": time.perf_counter() - started, "linear_bytes": linear_bytes(model)}
    report_perplexity(model, context, row)
    if row["ppl_ratio"] <= context.limit_ratio or row["is_seed"]:
        row |= measure_checkpoint(model, recipe, steps, context)
    row |= {"final": True, "computed_at": time.time(), **objective_values(row, config)}
    cache.put(recipe.name, row)
    tune.report(row)


def report_perplexity(model: torch.nn.Module, context: TrialContext, row: dict) -> None:
    """Report after every batch of windows but the last; leave the totals in `row` for the final report."""
    config = context.config
    stream = perplexity_stream(model, context.eval_tokens, config.eval.window, config.eval.batch_size)
    for partial, base_nll in zip(stream, context.baseline_nll, strict=True):
        if row.get("windows_done") is not None:  # the previous batch was not the last: report it
            tune.report({**row, "final": False, **objective_values(row, config)})
        row |= {"ppl": math.exp(partial.nll), "ppl_ratio": math.exp(partial.nll - base_nll),
                "windows_done": partial.windows, "tokens_evaluated": partial.tokens}


def measure_checkpoint(model: torch.nn.Module, recipe: Recipe, steps: list[dict], context: TrialContext) -> dict:
    """Checkpoint bytes, and decode tokens/s on our engine from that checkpoint, as it would be served."""
    config = context.config
    wanted = [n for n, key in ((1, "decode_b1"), (config.speed.batch_n, "decode_bN")) if key in config.measured()]
    with tempfile.TemporaryDirectory(prefix="rayfoundry-trial-") as tmp:
        folder = Path(tmp) / "model"
        save_compressed(model, folder, Path(context.model_path), recipe.model_dump(mode="json"), steps)
        measured = {"checkpoint_bytes": checkpoint_bytes(folder)}
        if wanted:
            rates = decode_rates(folder, config.speed.engine, wanted, config.speed.prompt_tokens,
                                 config.speed.max_tokens)
            measured["decode_b1"] = rates.get(1)
            measured["decode_bN"] = rates.get(config.speed.batch_n)
    return measured


def objective_values(row: dict, config: SearchConfig) -> dict:
    return {metric_key(o): row.get(o) for o in config.objectives}
