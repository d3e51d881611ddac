"""Compare compression recipes on one model, all measured in this one run.

    python -m jobs.compare --config configs/jobs/compare.yaml

For the uncompressed model and each recipe: perplexity on the first N tokens of a dataset split,
bytes (the compressed linears against their float32 bytes, and the whole checkpoint), and our
engine's decode tokens/s at each batch size (greedy, EOS ignored, identical random prompts).
Each recipe's checkpoint is written to the model store as `<model>.<recipe name>` (reused when
one made from the same recipe is already there) and measured from there, as a user would serve it.
Prints the table and ratios to the uncompressed model; stores results.parquet, results.md and a PNG.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from pydantic import Field
from tqdm import tqdm

from cluster.config import StrictConfig, load_config
from cluster.errors import UserError, reports_user_errors
from cluster.store import Store
from jobs.bench.decode import decode_rates
from jobs.bench.report import markdown_table, png_figure, store_results
from jobs.compress.pipeline import compress_model
from jobs.compress.recipe import Recipe
from jobs.data.prepared import open_dataset
from jobs.data.shards import read_tokens
from jobs.eval.perplexity import perplexity
from jobs.eval.size import checkpoint_bytes, compressed_linear_bytes
from jobs.models.load import load_causal_lm, model_dir, open_model
from serve_apps.engine.config import EngineConfig

BASELINE = "fp32"


class CompareConfig(StrictConfig):
    model: str = "smollm2-135m-instruct"
    recipes: list[str] = Field(min_length=1, description="recipe YAML files")
    data: str = "shakespeare"
    split: str = "validation"
    tokens: int = Field(20480, ge=2)
    window: int = Field(512, ge=2)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    prompt_tokens: int = Field(32, ge=1)
    max_tokens: int = Field(64, ge=2)
    threads: int = Field(2, ge=1)
    reuse: bool = Field(True, description="reuse a stored checkpoint made from the same recipe")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(kv_cache_memory_gib=0.5))
    store: str | None = None


def checkpoint_for(config: CompareConfig, recipe: Recipe, store: Store) -> str:
    name = f"{open_model(config.model, store).name}.{recipe.name}"
    stored = store.get("models", name)
    if config.reuse and stored is not None and stored.manifest.get("recipe") == recipe.model_dump(mode="json"):
        print(f"{recipe.name}: reusing stored {name}", file=sys.stderr)
        return name
    compress_model(config.model, recipe, name, store, force=True)
    return name


def decode_columns(path: Path, config: CompareConfig) -> dict[str, float | None]:
    rates = decode_rates(path, config.engine, config.batch_sizes, config.prompt_tokens, config.max_tokens)
    return {f"decode_tok_s_b{n}": rate for n, rate in rates.items()}


def measure(name: str, ref: str, config: CompareConfig, tokens: torch.Tensor, store: Store) -> dict:
    path = model_dir(ref, store)
    model = load_causal_lm(path)
    with tqdm(total=-(-len(tokens) // config.window), desc=f"{name} perplexity", file=sys.stderr) as bar:
        ppl = perplexity(model, tokens, config.window, progress=bar.update).ppl
    stored, dense = compressed_linear_bytes(model)
    del model
    row = {"variant": name, "model": ref, "ppl": ppl, "linears_bytes": stored, "linears_fp32_bytes": dense,
           "model_bytes": checkpoint_bytes(path)}
    return {**row, **decode_columns(path, config)}


def add_ratios(rows: list[dict], batch_sizes: list[int]) -> None:
    base = rows[0]
    for row in rows:
        row["ppl_change"] = row["ppl"] / base["ppl"] - 1
        row["linears_ratio"] = row["linears_bytes"] / row["linears_fp32_bytes"] if row["linears_fp32_bytes"] else None
        row["model_ratio"] = row["model_bytes"] / base["model_bytes"]
        for n in batch_sizes:
            key = f"decode_tok_s_b{n}"
            row[f"speedup_b{n}"] = row[key] / base[key] if row[key] and base[key] else None


def plot(rows: list[dict], path: Path, title: str) -> None:
    speed_keys = [k for k in rows[0] if k.startswith("decode_tok_s_b")]
    width = 0.8 / len(speed_keys)
    with png_figure(path, (12, 4.5), ncols=2) as (fig, (quality, speed)):
        for row in rows:
            quality.scatter(row["model_bytes"] / 2**20, row["ppl"])
            quality.annotate(row["variant"], (row["model_bytes"] / 2**20, row["ppl"]), fontsize=7)
        quality.set_xlabel("checkpoint MiB")
        quality.set_ylabel("perplexity")
        for i, key in enumerate(speed_keys):
            speed.bar([x + i * width for x in range(len(rows))], [r[key] or 0 for r in rows], width,
                      label=key.replace("decode_tok_s_b", "batch "))
        speed.set_xticks([x + width * (len(speed_keys) - 1) / 2 for x in range(len(rows))],
                         [r["variant"] for r in rows], rotation=30, ha="right", fontsize=7)
        speed.set_ylabel("decode tokens / s")
        speed.legend(fontsize=8)
        fig.suptitle(title)


def columns(batch_sizes: list[int]) -> list[str]:
    speed = [c for n in batch_sizes for c in (f"decode_tok_s_b{n}", f"speedup_b{n}")]
    return ["variant", "ppl", "ppl_change", "linears_ratio", "model_bytes", "model_ratio", *speed]


@reports_user_errors("python -m jobs.compare")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file (see configs/jobs/compare.yaml)")
    config = load_config(CompareConfig, parser.parse_args(argv).config)
    recipes = [load_config(Recipe, path) for path in config.recipes]  # every recipe checked before any work
    if len({r.name for r in recipes}) != len(recipes):
        raise UserError("two recipes share a name; each needs its own")
    torch.set_num_threads(config.threads)
    store = Store(config.store)
    dataset = open_dataset(config.data, store)
    tokens = torch.from_numpy(read_tokens(dataset, config.split, config.tokens).astype("int64"))
    rows = [measure(BASELINE, config.model, config, tokens, store)]
    for recipe in recipes:
        rows.append(measure(recipe.name, checkpoint_for(config, recipe, store), config, tokens, store))
    add_ratios(rows, config.batch_sizes)
    table = markdown_table(rows, columns(config.batch_sizes))
    print(table)
    uri = store_results("compare", rows, table, f"{config.model}: quality, size and speed per recipe", store, plot)
    print(f"results: {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
