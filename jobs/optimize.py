"""One command from a model to a cheaper served model.

    python -m jobs.optimize --model smollm2-135m-instruct --max-ppl-increase 5% [--recover qat] [--serve]
    rayfoundry optimize --model smollm2-135m-instruct --max-ppl-increase 5%

A search (jobs.search, with --config as its base) chooses the smallest recipe within the budget;
--recover qat trains for it (jobs.qat; the search space is then narrowed to what QAT trains for:
round-to-nearest weights, no pruning, no low rank); the checkpoint is stored as --out; a Serve config
for it is written (and deployed to the running cluster with --serve); one report compares the
original and the optimized model on perplexity, bytes and decode tokens/s at batch 1 and N, measured
in this run, with what the search cost. Exit 3 when no trial met the budget.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cluster.config import parse_config
from cluster.errors import UserError, reports_user_errors
from cluster.store import Store
from cluster.submit import cluster_address
from jobs.bench.decode import decode_rates
from jobs.bench.report import markdown_table, png_figure
from jobs.compress.pipeline import check_out_free
from jobs.compress.recipe import Recipe
from jobs.eval.perplexity import perplexity
from jobs.eval.size import checkpoint_bytes, linear_bytes
from jobs.models.load import load_causal_lm, model_dir, open_model
from jobs.search.config import SearchConfig
from jobs.search.run import SearchOutcome, search
from serve_apps.serve_run import check as check_serve_config
from serve_apps.serve_run import main as serve_main

QAT_METHODS = {"rtn"}  # what a search narrowed for QAT may choose (jobs/compress/fake_quant.py)
ROUNDS = 2  # decode measurements per model, taking turns, as the speed of a machine drifts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.optimize", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="stored name, path or URI of the model")
    parser.add_argument("--max-ppl-increase", required=True, metavar="BUDGET",
                        help="'5%%': at most 5 %% above the model's perplexity; a plain number: that many points")
    parser.add_argument("--data", help="prepared dataset for evaluation and calibration (default: the config's)")
    parser.add_argument("--trials", type=int, help="search trials (default: the config's)")
    parser.add_argument("--config", default="configs/jobs/search.yaml", help="the search config to start from")
    parser.add_argument("--recover", choices=["qat"], help="train for the chosen recipe before storing it")
    parser.add_argument("--qat-config", default="configs/jobs/qat.yaml", help="training settings for --recover qat")
    parser.add_argument("--out", help="store name of the optimized model (default: <model>.optimized)")
    parser.add_argument("--serve", action="store_true", help="deploy it to the running Ray cluster")
    parser.add_argument("--force", action="store_true", help="start the search afresh and replace --out")
    parser.add_argument("--store", help="store URI (default: $RAYFOUNDRY_STORE or ~/.rayfoundry/store)")
    return parser.parse_args(argv)


def budget(text: str) -> dict:
    try:
        if text.endswith("%"):
            return {"max_ppl_increase": float(text[:-1]) / 100, "relative": True}
        return {"max_ppl_increase": float(text), "relative": False}
    except ValueError:
        raise UserError(f"--max-ppl-increase {text!r}: give a percentage such as 5% or a number of points") from None


def short_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip(".-") or "model"


def search_config(args: argparse.Namespace) -> SearchConfig:
    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text())
    data |= {"name": f"optimize-{short_name(args.model)}", "model": args.model, "budget": budget(args.max_ppl_increase),
             "store": args.store, "force": args.force}
    if args.data:
        data["data"] = args.data
        if data.get("calibration"):
            data["calibration"]["data"] = args.data
    if args.trials:
        data["num_trials"] = args.trials
    if args.recover == "qat":
        narrow_for_qat(data)
    return parse_config(SearchConfig, data, source=str(path))


def narrow_for_qat(data: dict) -> None:
    """QAT trains round-to-nearest weights only: no GPTQ, pruning or low rank, so no calibration."""
    space = data.setdefault("space", {})
    space |= {"quant_method": ["rtn"], "sparsity": {"low": 0, "high": 0, "step": 0.1},
              "lowrank_energy": {"low": 1, "high": 1, "step": 0.05}}
    space["bits"] = [b for b in space.get("bits", [4, 8, None]) if b is not None] or [8]
    data.pop("calibration", None)
    seeds = data.get("seeds", {}).get("recipes", [])
    data.setdefault("seeds", {})["recipes"] = [s for s in seeds if _trainable(s)]
    print("--recover qat: the space is narrowed to round-to-nearest weights (what QAT trains for)")


def _trainable(recipe_file: str) -> bool:
    recipe = Recipe.model_validate(yaml.safe_load(Path(recipe_file).read_text()))
    return all(step.method in QAT_METHODS for step in recipe.steps)


def recover_with_qat(args: argparse.Namespace, outcome: SearchOutcome, out: str, folder: Path) -> str:
    from jobs.qat import QATConfig, run as run_qat  # Ray Train and DeepSpeed only when asked for

    recipe_file = folder / "chosen.yaml"
    recipe_file.write_text(outcome.chosen["recipe_yaml"])
    settings = yaml.safe_load(Path(args.qat_config).read_text())
    settings |= {"model": args.model, "recipe": str(recipe_file), "out": out, "force": True, "store": args.store,
                 "run_name": f"qat-{out}-{time.strftime('%Y%m%d-%H%M%S')}"}
    if args.data:
        settings["data"] = args.data
    return run_qat(parse_config(QATConfig, settings, source=args.qat_config))["out"]


def serve_config(model_id: str, model_ref: str) -> dict:
    """A Serve config like configs/serve/smollm2.yaml for the optimized model, found at `model_ref`."""
    return {"http_options": {"host": "127.0.0.1", "port": 8000},
            "applications": [{"name": "llm", "route_prefix": "/",
                              "import_path": "serve_apps.app:build_app",
                              "args": {"ingress_num_cpus": 0, "models": [
                                  {"model_id": model_id, "model": model_ref, "num_replicas": 1,
                                   "num_cpus_per_replica": 1,
                                   "engine": {"kv_cache_memory_gib": 1.0, "max_num_seqs": 64}}]}}]}


def measure(name: str, ref: str, config: SearchConfig, tokens: torch.Tensor, store: Store) -> dict:
    path = model_dir(ref, store)
    model = load_causal_lm(path)
    ppl = perplexity(model, tokens, config.eval.window, config.eval.batch_size).ppl
    row = {"model": name, "ref": ref, "ppl": ppl, "linear_bytes": linear_bytes(model),
           "checkpoint_bytes": checkpoint_bytes(path)}
    return row


def add_speeds(rows: list[dict], config: SearchConfig, store: Store) -> None:
    """Decode tok/s at batch 1 and N, the models taking turns; the median of ROUNDS each."""
    batch = [1, config.speed.batch_n]
    samples = {row["model"]: [] for row in rows}
    for _ in range(ROUNDS):
        for row in rows:
            samples[row["model"]].append(decode_rates(model_dir(row["ref"], store), config.speed.engine, batch,
                                                      config.speed.prompt_tokens, config.speed.max_tokens))
    for row in rows:
        for n, key in ((1, "decode_b1"), (config.speed.batch_n, "decode_bN")):
            values = sorted(s[n] for s in samples[row["model"]] if s[n])
            row[key] = values[len(values) // 2] if values else None


def report(rows: list[dict], outcome: SearchOutcome, serve: dict, store: Store, title: str) -> str:
    """report.md, report.png, summary.json and serve.yaml as one result artifact; returns its URI."""
    base = rows[0]
    for row in rows:
        for key in ("ppl", "linear_bytes", "checkpoint_bytes", "decode_b1", "decode_bN"):
            row[f"{key}_vs_original"] = row[key] / base[key] if row.get(key) and base.get(key) else None
    columns = ["model", "ppl", "ppl_vs_original", "linear_bytes", "linear_bytes_vs_original", "checkpoint_bytes",
               "decode_b1", "decode_b1_vs_original", "decode_bN", "decode_bN_vs_original"]
    s = outcome.summary
    cost = (f"Search: {sum(s['trials'].values())} trials ({', '.join(f'{n} {k}' for k, n in s['trials'].items())}), "
            f"{s['tokens_evaluated']} tokens evaluated of {s['tokens_if_run_to_end']} had every trial run to the "
            f"end, {s['cpu_hours']:.2f} CPU-hours, {s['wall_s'] / 60:.1f} min; results {outcome.results_uri}.")
    text = "\n".join([f"# {title}", "", markdown_table(rows, columns), "", cost, "",
                      f"Chosen recipe: {s['chosen']}, stored as {rows[1]['ref']}."]) + "\n"
    print(text)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "report.md").write_text(text)
        (folder / "summary.json").write_text(json.dumps({"rows": rows, "search": s}, indent=2, default=str))
        (folder / "serve.yaml").write_text(yaml.safe_dump(serve, sort_keys=False))
        plot(rows, folder / "report.png", title)
        name = f"optimize-{short_name(base['ref'])}-{time.strftime('%Y%m%d-%H%M%S')}"
        return store.put_dir("results", name, folder, {"source": "optimize", "model": base["ref"]}).uri


def plot(rows: list[dict], path: Path, title: str) -> None:
    keys = ["ppl", "linear_bytes", "checkpoint_bytes", "decode_b1", "decode_bN"]
    width = 0.8 / len(rows)
    with png_figure(path, (9, 4)) as (_, ax):
        for i, row in enumerate(rows):
            ax.bar([x + i * width for x in range(len(keys))], [row.get(f"{k}_vs_original") or 0 for k in keys],
                   width, label=row["model"])
        ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(keys))], keys)
        ax.axhline(1.0, c="grey", lw=0.8)
        ax.set_ylabel("relative to the original")
        ax.set_title(title)
        ax.legend(fontsize=8)


def store_optimized(args: argparse.Namespace, outcome: SearchOutcome, out: str, store: Store) -> str:
    """The chosen model, trained first with --recover qat, stored as `out`; returns its URI."""
    with tempfile.TemporaryDirectory(prefix="rayfoundry-optimize-") as tmp:
        if args.recover == "qat":
            return recover_with_qat(args, outcome, out, Path(tmp))
    recipe = yaml.safe_load(outcome.chosen["recipe_yaml"])
    return store.put_dir("models", out, model_dir(outcome.summary["chosen_model"], store),
                         {"source": args.model, "format": "compressed", "recipe": recipe}, replace=args.force).uri


@reports_user_errors("python -m jobs.optimize")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve and cluster_address() is None:
        raise UserError("--serve deploys to a running Ray cluster and none answers; start one with `rayfoundry up`")
    store = Store(args.store)
    out = args.out or f"{short_name(open_model(args.model, store).name)}.optimized"
    check_out_free(out, store, args.force)
    config = search_config(args)
    outcome = search(config)
    if outcome.chosen is None:
        return outcome.exit_code
    out_ref = store_optimized(args, outcome, out, store)
    rows = [measure("original", args.model, config, outcome.eval_tokens, store),
            measure("optimized" + (" + QAT" if args.recover else ""), out_ref, config, outcome.eval_tokens, store)]
    add_speeds(rows, config, store)
    serve = serve_config(out, out_ref)
    with tempfile.TemporaryDirectory(prefix="rayfoundry-optimize-") as tmp:
        serve_file = Path(tmp) / "serve.yaml"
        serve_file.write_text(yaml.safe_dump(serve, sort_keys=False))
        check_serve_config(serve_file)
        title = f"{args.model}: optimized within {config.budget.describe()} perplexity"
        uri = report(rows, outcome, serve, store, title)
        print(f"report: {uri}\nserve it: rayfoundry serve {uri.removeprefix('file://')}/serve.yaml --detach")
        return serve_main([str(serve_file), "--detach"]) if args.serve else 0


if __name__ == "__main__":
    raise SystemExit(main())
