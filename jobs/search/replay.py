"""Early stopping checked: every trial a search stopped early, run again to the end.

    python -m jobs.search --config configs/jobs/search_smollm2.yaml --replay-stopped [all]

Reads the search's newest results, runs stopped trials' points with nothing stopping them (Tune run
`search-<name>-replay`, resumable like the search), and reports how many evaluation tokens the search
read against how many the same trials read when run to the end, which replayed trials end within
budget, and whether the recipe chosen from the full results is the one the search chose.

By default only the stopped trials that could change the choice are replayed: the choice takes the
least `choose.minimize` first, so a stopped trial whose value of it is known (bytes are measured
before perplexity) and above the chosen recipe's cannot displace it. The others count the tokens
every trial run to the end reads (the same evaluation windows for all). `all` replays every one.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.errors import UserError
from cluster.store import Store
from jobs.bench.report import markdown_table
from jobs.search.config import EarlyStopConfig, SearcherConfig, SearchConfig, SeedsConfig
from jobs.search.prepare import prepare
from jobs.search.confirm import choose_confirmed
from jobs.search.front import cost
from jobs.search.run import run_trials
from jobs.search.trial import run_name, run_trial

KNOWN_WHEN_STOPPED = {"linear_bytes"}  # measured on the compressed model, before any perplexity window
SHOWN = ["recipe_name", "ppl", "ppl_ratio", "windows_done", "tokens_evaluated", "linear_bytes", "decode_b1"]


def replay_config(config: SearchConfig, trials: int) -> SearchConfig:
    """The search's settings with the stopped points as the only trials: no searcher draws, nothing
    stops, no seeds (the points are given); the recipes keep the search's names."""
    choose = config.choose.model_copy(update={"min_decode_b1_vs": None})  # the search's seeds are not rerun
    return config.model_copy(update={
        "num_trials": trials, "seeds": SeedsConfig(), "early_stopping": EarlyStopConfig(kind="none"),
        "searcher": SearcherConfig(kind="random", seed=config.searcher.seed), "choose": choose})


def could_change_choice(stopped: list[dict], chosen: dict | None, minimize: str) -> list[dict]:
    """The stopped rows that, run to the end, could be chosen: every one when nothing was chosen or
    the choice's objective is only known at the end, else those whose value is unknown or no worse
    than the chosen row's."""
    if chosen is None or minimize not in KNOWN_WHEN_STOPPED:
        return stopped
    return [r for r in stopped if r.get(minimize) is None or cost(r, minimize) <= cost(chosen, minimize)]


def replay_stopped(config: SearchConfig, which: str = "decisive") -> int:
    store = Store(config.store)
    original = store.newest_result("search", config.name)
    if original is None:
        raise UserError(f"search {config.name} has no results to replay; run it first")
    rows = pq.read_table(original.file_path("results.parquet"), filesystem=original.fs).to_pylist()
    summary = json.loads(original.read_text("summary.json"))
    stopped = [r for r in rows if r["status"] == "stopped"]
    chosen = next((r for r in rows if r["recipe_name"] == summary["chosen"]), None)
    decisive = stopped if which == "all" else could_change_choice(stopped, chosen, config.choose.minimize)
    replayed = run_to_end(config, decisive, store, len(stopped), original.uri)
    report = compare(rows, replayed, summary)
    if report["within_budget_at_end"]:  # the choice is made again, as the search made it, over all trials
        full = annotated([r for r in rows if r["status"] != "stopped"] + replayed, summary["limit"])
        chosen, _ = choose_confirmed(config, full, summary["baseline"], summary["limit"], store)
        report["full"] = chosen["recipe_name"] if chosen else None
    report["same_choice"] = report["full"] == report["search"]
    text = markdown(config, report, replayed)
    print(text)
    print(f"results: {store_replay(config, replayed, report, text, store)}")
    return 0


def run_to_end(config: SearchConfig, points: list[dict], store: Store, stopped: int, source: str) -> list[dict]:
    """The rows of `points` (stopped trials' rows) run with nothing stopping them."""
    if not points:
        print(f"search {config.name}: none of its {stopped} stopped trials could change its choice; nothing to "
              "replay (`--replay-stopped all` replays them all)")
        return []
    print(f"replaying {len(points)} of the {stopped} trials search {config.name} stopped early ({source})",
          flush=True)
    replay = replay_config(config, len(points))
    prepared = prepare(replay, store)
    prepared.seed_points = [json.loads(r["params_json"]) for r in points]
    return run_trials(replay, prepared, store, run_trial, f"{run_name(config)}-replay").rows


def annotated(rows: list[dict], limit: float) -> list[dict]:
    return [{**r, "within_budget": r["status"] == "complete" and r["ppl"] <= limit} for r in rows]


def compare(rows: list[dict], replayed: list[dict], summary: dict) -> dict:
    """Tokens with and without early stopping: a stopped trial not replayed counts what a trial run to
    the end reads. When every replayed trial ends over budget, the trials within budget, and so the
    choice, are the search's own: `full` is then the search's choice."""
    ran = [r for r in rows if r["status"] == "complete" and not r.get("cached")]
    stopped = [r for r in rows if r["status"] == "stopped"]
    full_tokens = summary["baseline"]["tokens_evaluated"]  # the float model's reference: every window
    to_end = sum(r["tokens_evaluated"] or 0 for r in ran + replayed) + full_tokens * (len(stopped) - len(replayed))
    return {"search": summary["chosen"], "full": summary["chosen"],
            "tokens_search": summary["tokens_evaluated"], "tokens_to_end": to_end,
            "saving": to_end / summary["tokens_evaluated"] if summary["tokens_evaluated"] else 1.0,
            "stopped": len(stopped), "replayed": len(replayed),
            "errors": sum(r["status"] == "error" for r in replayed),
            "within_budget_at_end": [r["recipe_name"] for r in replayed
                                     if r["status"] == "complete" and r["ppl"] <= summary["limit"]]}


def markdown(config: SearchConfig, report: dict, replayed: list[dict]) -> str:
    lost = ", ".join(report["within_budget_at_end"]) or "none"
    skipped = report["stopped"] - report["replayed"]
    why = ""
    if not report["within_budget_at_end"]:
        why = ": no replayed trial ends within budget" if replayed else ""
        why += f"{'; ' if why else ': '}the {skipped} not replayed are larger than the choice" if skipped else ""
    table = markdown_table(sorted(replayed, key=lambda r: r["ppl_ratio"] or float("inf")), SHOWN) if replayed else ""
    return "\n".join([
        f"# Search {config.name}: stopped trials run to the end", "",
        f"Tokens evaluated: {report['tokens_search']} by the search, {report['tokens_to_end']} with the same trials "
        f"run to the end ({report['saving']:.2f}x fewer with early stopping).",
        f"Replayed {report['replayed']} of {report['stopped']} stopped trials ({report['errors']} errors); "
        f"within budget at the end: {lost}.",
        f"Chosen by the search: {report['search']}; from the full results: {report['full']} "
        f"({'the same' if report['same_choice'] else 'DIFFERENT'}{why}).", "", table])


def store_replay(config: SearchConfig, replayed: list[dict], report: dict, text: str, store: Store) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pq.write_table(pa.Table.from_pylist(replayed), out / "replayed.parquet")
        (out / "replay.md").write_text(text + "\n")
        (out / "replay.json").write_text(json.dumps(report, indent=2) + "\n")
        name = f"search-{config.name}-replay-{time.strftime('%Y%m%d-%H%M%S')}"
        return store.put_dir("results", name, out, {"source": "search-replay", "run": config.name}).uri
