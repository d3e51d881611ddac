"""A search's results: one row per trial, the front, the chosen recipe; stored as one result artifact
(results.parquet, results.md, results.png, chosen.yaml, front/<recipe>.yaml, summary.json)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from cluster.store import Store
from jobs.bench.report import markdown_table
from jobs.search.config import SearchConfig
from jobs.search.front import pareto_front
from jobs.search.plot import plot
from jobs.search.sensitivity import markdown_rows
from jobs.search.trial import TrialContext

REPORTED = ("seed_name", "is_seed", "ppl", "ppl_ratio", "windows_done", "tokens_evaluated", "linear_bytes",
            "checkpoint_bytes", "decode_b1", "decode_bN", "node_id", "measured_by_pid", "computed_at",
            "compress_s", "cached", "time_total_s")
SHOWN = ["recipe_name", "seed_name", "status", "ppl", "ppl_change", "linear_MiB", "checkpoint_MiB",
         "decode_b1", "decode_bN"]


def trial_rows(results, context: TrialContext) -> list[dict]:
    """Tune's ResultGrid as rows: what each trial last reported, its recipe, its fate."""
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        recipe = _recipe_or_none(context, result.config)
        status = "error" if result.error else "complete" if metrics.get("final") else "stopped"
        row = {"trial_id": metrics.get("trial_id") or Path(result.path).name, "status": status,
               "recipe_name": recipe.name if recipe else "uncompressed",
               "recipe_yaml": yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False) if recipe else None,
               "params_json": json.dumps(result.config, sort_keys=True),
               "error": _last_line(result.error) if result.error else None,
               **{key: metrics.get(key) for key in REPORTED}}
        if row["seed_name"] is None and recipe is not None:
            row["seed_name"] = context.seeds.get(recipe.name)
        rows.append(row)
    return rows


def _recipe_or_none(context: TrialContext, point: dict):
    try:
        return context.recipe(point)
    except Exception:  # noqa: BLE001 -- a point that failed to render is an errored trial, kept as such
        return None


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def annotate(rows: list[dict], baseline: dict, limit: float, objectives: list[str]) -> list[int]:
    """Add derived columns; returns the indices of the rows on the front (complete trials only)."""
    for row in rows:
        row["ppl_change"] = None if row["ppl"] is None else row["ppl"] / baseline["ppl"] - 1
        row["within_budget"] = row["status"] == "complete" and row["ppl"] <= limit
        row["linear_MiB"] = None if row["linear_bytes"] is None else row["linear_bytes"] / 2**20
        row["checkpoint_MiB"] = None if row["checkpoint_bytes"] is None else row["checkpoint_bytes"] / 2**20
    # One row per recipe: a point that renders like an earlier one reports that one's measurements.
    first = {}
    for i, row in enumerate(rows):
        if row["status"] == "complete":
            first.setdefault(row["recipe_name"], i)
    complete = sorted(first.values())
    front = [complete[i] for i in pareto_front([rows[i] for i in complete], objectives)]
    for i, row in enumerate(rows):
        row["on_front"] = i in front
    return front


def markdown(config: SearchConfig, rows: list[dict], front: list[int], baseline: dict, summary: dict) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in summary["trials"].items())
    lines = [f"# Search {config.name}: {config.model}", "",
             f"Budget: perplexity at most {summary['limit']:.4g} ({config.budget.describe()} over "
             f"{baseline['ppl']:.4g}). Objectives: {', '.join(config.objectives)}. Trials: {counts}.",
             f"Tokens evaluated: {summary['tokens_evaluated']} of {summary['tokens_if_run_to_end']} had every "
             f"trial run to the end ({summary['early_stop_saving']:.2f}x fewer).",
             f"Chosen: {summary['chosen'] or 'none'}.", *speed_checks(summary), *reproduction(summary), "",
             "## Front", ""]
    shown = [{**baseline, "recipe_name": "uncompressed", "seed_name": "fp32", "status": "reference",
              "ppl_change": 0.0, "linear_MiB": baseline["linear_bytes"] / 2**20,
              "checkpoint_MiB": (baseline.get("checkpoint_bytes") or 0) / 2**20 or None}]
    shown += sorted((rows[i] for i in front), key=lambda r: r["linear_bytes"])
    lines.append(markdown_table(shown, SHOWN))
    seeds = [r for r in rows if r["seed_name"]]
    if seeds:
        lines += ["", "## Seed recipes (reference points)", "", markdown_table(seeds, SHOWN)]
    if summary.get("sensitivity"):
        lines += ["", "## Sensitivity: each group quantized alone", "",
                  markdown_table(markdown_rows(summary["sensitivity"]),
                                 ["group", "width", "method", "ppl", "ppl_change", "MiB_saved"])]
    return "\n".join(lines)


def speed_checks(summary: dict) -> list[str]:
    return [f"Speed check: {c['recipe_name']} {c['decode_b1']:.1f} tok/s at batch 1 against {c['reference']} "
            f"{c['reference_decode_b1']:.1f} (medians of {len(c['samples'])}, measured in turns): "
            f"{'as fast' if c['passed'] else 'slower'}." for c in summary.get("speed_checks", [])]


def reproduction(summary: dict) -> list[str]:
    checks = ([summary["reproduced"]] if "reproduced" in summary else []) + summary.get("front_reproduced", [])
    if not checks:
        return []
    same = sum(c["same_to_4_digits"] for c in checks)
    return [f"Reapplied as `python -m jobs.compress` would: {same} of {len(checks)} recipes give their trial's "
            f"perplexity to 4 significant digits."]


def store_search_results(config: SearchConfig, rows: list[dict], front: list[int], baseline: dict, limit: float,
                         summary: dict, chosen_yaml: str | None, store: Store) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pq.write_table(pa.Table.from_pylist(rows), out / "results.parquet")
        (out / "results.md").write_text(markdown(config, rows, front, baseline, summary) + "\n")
        plot(rows, baseline, limit, out / "results.png", f"{config.model}: search {config.name}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if chosen_yaml:
            (out / "chosen.yaml").write_text(chosen_yaml)
        (out / "front").mkdir()
        for i in front:
            if rows[i]["recipe_yaml"]:
                (out / "front" / f"{rows[i]['recipe_name']}.yaml").write_text(rows[i]["recipe_yaml"])
        name = f"search-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return store.put_dir("results", name, out, {"source": "search", "run": config.name}).uri
