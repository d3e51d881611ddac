"""Search compression recipes with Ray Tune for the smallest, fastest model within a quality budget.

    python -m jobs.search --config configs/jobs/search.yaml [--force] [--replay-stopped [all]]

Each trial renders a recipe from a point of the space (per module group: bits, group size, sparsity;
method, pattern, low-rank energy), compresses the model with it, reports perplexity as it is measured
(hopeless trials stop early), then checkpoint bytes and decode tokens/s on our engine. Results: every
trial in Parquet, the Pareto front as Markdown and PNG, the chosen recipe as YAML and its checkpoint
in the model store. Exit 0 with a chosen recipe, 2 for a bad config (before any trial), 3 when no
trial met the budget, 130 when interrupted (nothing is written as results). Run again after an interruption to resume: finished trials are not redone.
--replay-stopped runs the trials the search stopped early to the end, and reports what stopping saved
and whether it changed the chosen recipe (jobs/search/replay.py).
"""
from __future__ import annotations

import argparse

from cluster.config import load_config
from cluster.errors import reports_user_errors
from jobs.search.config import SearchConfig
from jobs.search.replay import replay_stopped
from jobs.search.run import run_search


@reports_user_errors("python -m jobs.search")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file (see configs/jobs/search.yaml)")
    parser.add_argument("--force", action="store_true", help="start afresh, deleting a run of the same name")
    parser.add_argument("--replay-stopped", nargs="?", const="decisive", choices=["decisive", "all"],
                        help="run to the end the trials the search's newest results stopped early that could "
                             "change its choice (all: every one), and compare")
    args = parser.parse_args(argv)
    config = load_config(SearchConfig, args.config)
    if args.force:
        config.force = True
    return replay_stopped(config, args.replay_stopped) if args.replay_stopped else run_search(config)


if __name__ == "__main__":
    raise SystemExit(main())
