"""A search from start to end: checks, the uncompressed baseline, Tune's trials, results, the chosen
recipe compressed into the model store and its perplexity reproduced."""
from __future__ import annotations

import math
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune
from ray.tune.search import BasicVariantGenerator

from cluster.errors import BUDGET_NOT_MET_EXIT_CODE, Interrupted, UserError
from cluster.store import Store
from jobs.bench.decode import decode_rates
from jobs.eval.perplexity import perplexity_stream
from jobs.eval.size import checkpoint_bytes, linear_bytes
from jobs.models.load import load_causal_lm
from jobs.search.config import SearchConfig
from jobs.search.finalize import store_chosen, verify_front
from jobs.search.confirm import choose_confirmed
from jobs.search.front import closest
from jobs.search.prepare import Prepared, prepare
from jobs.search.progress import SearchProgress
from jobs.search.results import annotate, markdown, store_search_results, trial_rows
from jobs.search.searchers import make_searcher, metric_key
from jobs.search.sensitivity import ProbeContext, sensitivity_seeds
from jobs.search.shared import ensure_statistics
from jobs.search.space import grid_space, param_space
from jobs.search.stopping import make_stopping
from jobs.search.trial import TrialContext, objective_values, run_name, run_trial
from jobs.train.run import claim_run, connect, runs_uri


@dataclass
class SearchOutcome:
    exit_code: int  # 0 with a chosen recipe, BUDGET_NOT_MET_EXIT_CODE when no trial met the budget
    summary: dict  # what summary.json holds
    chosen: dict | None  # the chosen trial's row
    results_uri: str
    eval_tokens: torch.Tensor


def run_search(config: SearchConfig, trial_fn: Callable = run_trial) -> int:
    """`trial_fn` is Tune's trainable (tests wrap run_trial to make one fail)."""
    return search(config, trial_fn).exit_code


@dataclass
class Trials:
    """What Tune's trials of one run gave, with the reference they were measured against."""

    rows: list[dict]
    baseline: dict
    limit: float
    sensitivity: list[dict]
    seconds: float


def search(config: SearchConfig, trial_fn: Callable = run_trial) -> SearchOutcome:
    store = Store(config.store)
    prepared = prepare(config, store)
    trials = run_trials(config, prepared, store, trial_fn, run_name(config))
    rows, baseline, limit = trials.rows, trials.baseline, trials.limit
    front = annotate(rows, baseline, limit, config.objectives)
    chosen, speed_checks = choose_confirmed(config, rows, baseline, limit, store)
    summary = summarize(config, rows, baseline, limit, chosen, trials.seconds)
    summary |= {"speed_checks": speed_checks, "sensitivity": trials.sensitivity}
    if chosen is not None:
        summary["chosen_model"], summary["reproduced"] = store_chosen(config, chosen, prepared.eval_tokens, store)
    if config.verify == "front":
        others = [rows[i] for i in front if chosen is None or rows[i]["recipe_name"] != chosen["recipe_name"]]
        summary["front_reproduced"] = verify_front(config, others, prepared.eval_tokens, store)
    uri = store_search_results(config, rows, front, baseline, limit, summary,
                               chosen["recipe_yaml"] if chosen else None, store)
    print(markdown(config, rows, front, baseline, summary))
    print(f"results: {uri}")
    if chosen is None:
        print(not_chosen_reason(config, rows, limit))
        return SearchOutcome(BUDGET_NOT_MET_EXIT_CODE, summary, None, uri, prepared.eval_tokens)
    print(f"chosen: {chosen['recipe_name']} -> model {summary['chosen_model']}")
    return SearchOutcome(0, summary, chosen, uri, prepared.eval_tokens)


def not_chosen_reason(config: SearchConfig, rows: list[dict], limit: float) -> str:
    within = [r for r in rows if r["recipe_yaml"] and r["within_budget"]]
    if within:
        return (f"{len(within)} trials met ppl <= {limit:.4g} but none was as fast as "
                f"{config.choose.min_decode_b1_vs} measured in turns (choose.min_decode_b1_vs)")
    near = closest(rows)
    where = f"; closest: {near['recipe_name']} ppl {near['ppl']:.4g} ({near['ppl_change']:+.1%})" if near else ""
    return f"no trial met ppl <= {limit:.4g}{where}"


def run_trials(config: SearchConfig, prepared: Prepared, store: Store, trial_fn: Callable, run: str) -> Trials:
    """Tune run `run` of the config's trials (resumed when the store holds it), after the work they share."""
    # A resumed run must be the same search; `force` itself is not part of what it was.
    claim_run(config.model_copy(update={"force": False}), run, store, fresh=config.force)
    connect(config.ray_address, config.resources_per_trial.cpu * config.concurrency)
    # The shared calibration statistics first: they take every CPU the cluster has.
    stats_entry = ensure_statistics(config, prepared.groups, store)
    nll, baseline = ray.get(measure_baseline.options(num_cpus=config.resources_per_trial.cpu).remote(
        config, str(prepared.model_path), prepared.eval_tokens))
    limit = config.budget.limit(baseline["ppl"])
    sensitivity = add_sensitivity_seeds(config, prepared, stats_entry, limit / baseline["ppl"], store)
    context = TrialContext(config, run, prepared.groups, prepared.found, str(prepared.model_path), store.uri,
                           prepared.eval_tokens, stats_entry, nll, limit / baseline["ppl"], prepared.seed_names,
                           baseline)
    started = time.time()
    grid = fit(config, context, prepared, store, trial_fn)
    check_finished(grid, config, run)
    return Trials(trial_rows(grid, context), baseline, limit, sensitivity, time.time() - started)


def check_finished(grid: tune.ResultGrid, config: SearchConfig, run: str) -> None:
    """Tune hands back what it has when interrupted (Ctrl-C): results of part of a run would mislead."""
    done = grid.num_terminated + grid.num_errors
    expected = len(grid) if config.searcher.kind == "grid" else config.num_trials
    if done < max(len(grid), expected):
        raise Interrupted(f"{run} stopped with {done} of {expected} trials finished; "
                          "run the same command again to resume it")


@ray.remote
def measure_baseline(config: SearchConfig, model_path: str, tokens: torch.Tensor) -> tuple[list[float], dict]:
    """The uncompressed model measured as a trial is: nll after each batch of windows, and its row."""
    torch.set_num_threads(max(1, int(config.resources_per_trial.cpu)))
    model = load_causal_lm(Path(model_path))
    partials = list(perplexity_stream(model, tokens, config.eval.window, config.eval.batch_size))
    row = {"recipe_name": "uncompressed", "seed_name": "fp32", "is_seed": False, "ppl": math.exp(partials[-1].nll),
           "ppl_ratio": 1.0, "windows_done": partials[-1].windows, "tokens_evaluated": partials[-1].tokens,
           "linear_bytes": linear_bytes(model), "final": True,
           "checkpoint_bytes": checkpoint_bytes(Path(model_path))}
    del model
    wanted = {1: "decode_b1", config.speed.batch_n: "decode_bN"}
    wanted = {n: key for n, key in wanted.items() if key in config.measured()}
    if wanted:
        rates = decode_rates(Path(model_path), config.speed.engine, list(wanted), config.speed.prompt_tokens,
                             config.speed.max_tokens)
        row |= {key: rates[n] for n, key in wanted.items()}
    return [p.nll for p in partials], {**row, **objective_values(row, config)}


def add_sensitivity_seeds(config: SearchConfig, prepared: Prepared, stats_entry: str | None, limit_ratio: float,
                          store: Store) -> list[dict]:
    """The sensitivity table (empty unless seeds.sensitivity asks); its mixed seeds join the prepared ones."""
    if config.seeds.sensitivity is None:
        return []
    probe = ProbeContext(config, prepared.groups, prepared.found, str(prepared.model_path), store.uri,
                         prepared.eval_tokens[:config.seeds.sensitivity.tokens], stats_entry)
    table, points, names = sensitivity_seeds(probe, limit_ratio, prepared.seed_names, store)
    prepared.seed_points += points
    prepared.seed_names |= names
    return table


def fit(config: SearchConfig, context: TrialContext, prepared: Prepared, store: Store, trial_fn: Callable):
    trainable = tune.with_resources(tune.with_parameters(trial_fn, context=context),
                                    {"cpu": config.resources_per_trial.cpu, "gpu": config.resources_per_trial.gpu})
    path = f"{runs_uri(store)}/{context.run}"
    if tune.Tuner.can_restore(path):
        print(f"resuming search {config.name} from {path}: finished trials are not run again", flush=True)
        try:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        except (EOFError, pickle.UnpicklingError) as exc:  # a run that died while Tune wrote its state
            raise UserError(f"search {config.name} cannot resume: Tune's state in {path} is unreadable "
                            f"({type(exc).__name__}); start it afresh with --force") from None
    else:
        tuner = new_tuner(config, context, prepared, store, trainable)
    return tuner.fit()


def new_tuner(config: SearchConfig, context: TrialContext, prepared: Prepared, store: Store, trainable) -> tune.Tuner:
    grid = config.searcher.kind == "grid"
    windows = math.ceil(config.eval.tokens / config.eval.window)
    stopper, scheduler = make_stopping(config.early_stopping, context.limit_ratio, windows)
    worst = {metric_key(o): worst_value(o, context.baseline) for o in config.objectives}
    searcher = make_searcher(config, prepared.seed_points, context.limit_ratio, worst)
    return tune.Tuner(
        trainable,
        param_space=grid_space(prepared.found) if grid else param_space(prepared.found),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=1 if grid else config.num_trials,
            # a BasicVariantGenerator limits itself (searchers.py); Tune refuses to wrap one
            max_concurrent_trials=None if isinstance(searcher, BasicVariantGenerator) else config.concurrency),
        run_config=tune.RunConfig(
            name=context.run, storage_path=runs_uri(store), stop=stopper,
            failure_config=tune.FailureConfig(max_failures=config.max_retries, fail_fast=False),
            callbacks=[SearchProgress(config.name, config.objectives, context.limit_ratio)]),
    )


def worst_value(objective: str, baseline: dict) -> float:
    """What the searcher is told for an objective a trial never measured: no better than the
    uncompressed model's bytes, no tokens/s at all."""
    return 0.0 if objective.startswith("decode") else float(baseline.get(objective) or 0.0)


def summarize(config: SearchConfig, rows: list[dict], baseline: dict, limit: float, chosen: dict | None,
              seconds: float) -> dict:
    ran = [r for r in rows if r["status"] != "error" and not r.get("cached")]
    evaluated = sum(r["tokens_evaluated"] or 0 for r in ran)
    full = len(ran) * baseline["tokens_evaluated"]
    cpu_seconds = sum((r.get("time_total_s") or 0) for r in rows) * config.resources_per_trial.cpu
    return {"model": config.model, "baseline": baseline, "limit": limit, "budget": config.budget.model_dump(),
            "trials": dict(Counter(r["status"] for r in rows)), "tokens_evaluated": evaluated,
            "tokens_if_run_to_end": full, "early_stop_saving": full / evaluated if evaluated else 1.0,
            "cpu_hours": cpu_seconds / 3600, "wall_s": seconds,
            "chosen": chosen["recipe_name"] if chosen else None}
