"""Per-layer sensitivity of a model to one compression step.

    python -m jobs.sensitivity --model smollm2-135m-instruct --data shakespeare \\
        --step "{method: rtn, bits: 4, group_size: 64}" --tokens 4096 [--layers "*.mlp.*"]

Compresses each chosen layer alone, measures perplexity on the first --tokens validation tokens,
restores it; prints the layers by perplexity change (largest first) and stores results.parquet,
results.md and a PNG as a result artifact.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from pydantic import TypeAdapter, ValidationError
from tqdm import tqdm

from cluster.config import describe_validation_error
from cluster.errors import UserError, reports_user_errors
from cluster.store import Store
from jobs.bench.report import markdown_table, png_figure, store_results
from jobs.compress.calibration import CalibrationConfig, collect, token_batches
from jobs.compress.layer_sensitivity import layer_sensitivity
from jobs.compress.pipeline import calibration_tokens
from jobs.compress.recipe import AnyStep, Recipe
from jobs.data.prepared import open_dataset
from jobs.data.shards import read_tokens
from jobs.eval.perplexity import perplexity
from jobs.models.load import load_causal_lm, model_dir


def parse_step(text: str):
    try:
        data = yaml.safe_load(text)
        return TypeAdapter(AnyStep).validate_python(data)
    except yaml.YAMLError as exc:
        raise UserError(f"--step is not YAML: {exc}") from None
    except ValidationError as exc:
        raise UserError(describe_validation_error("--step", exc)) from None


def plot(rows: list[dict], path: Path, title: str) -> None:
    with png_figure(path, (max(6, 0.12 * len(rows)), 4)) as (_, ax):
        ax.bar(range(len(rows)), [r["delta"] for r in rows])
        ax.set_xticks(range(len(rows)), [r["layer"].removeprefix("model.") for r in rows], rotation=90, fontsize=5)
        ax.set_ylabel("perplexity change")
        ax.set_title(title)


@reports_user_errors("python -m jobs.sensitivity")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.sensitivity", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="stored model name, path or URI")
    parser.add_argument("--data", required=True, help="prepared dataset (validation split scores, train calibrates)")
    parser.add_argument("--step", required=True, help='one recipe step as YAML, e.g. "{method: rtn, bits: 4}"')
    parser.add_argument("--tokens", type=int, default=4096, help="validation tokens per evaluation")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--layers", help="only layers matching this pattern (fnmatch)")
    parser.add_argument("--store", help="store URI (default: $RAYFOUNDRY_STORE or ~/.rayfoundry/store)")
    args = parser.parse_args(argv)
    step = parse_step(args.step)
    if args.layers:
        step = step.model_copy(update={"modules": [args.layers]})
    store = Store(args.store)
    path = model_dir(args.model, store)
    model = load_causal_lm(path)
    try:
        step.check(model)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    tokens = torch.from_numpy(read_tokens(open_dataset(args.data, store), "validation", args.tokens).astype("int64"))
    stats = None
    if kinds := step.stats_needed():
        calibration = CalibrationConfig(data=args.data, samples=16)
        recipe = Recipe(name="sensitivity", calibration=calibration, steps=[step])
        batches = token_batches(calibration_tokens(recipe, args.model, path, store), calibration)
        stats = collect(model, step.targets(model), kinds, batches)
    rows = [r.row() for r in layer_sensitivity(model, step, lambda m: perplexity(m, tokens, args.window).ppl,
                                               stats=stats)]
    rows.sort(key=lambda r: -r["delta"])
    table = markdown_table(rows, ["layer", "baseline", "compressed", "delta", "bytes_before", "bytes_after"])
    print(table)
    tqdm.write(f"results: {store_results('sensitivity', rows, table, f'{args.model}: {step.method}', store, plot)}",
               file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
