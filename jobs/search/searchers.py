"""The searchers a config names, with Tune's OptunaSearch made to tell Optuna what our trials did.

Ray Tune's OptunaSearch (ray 2.60) has three gaps this module closes (tests/test_search_optuna.py pins
both ours and the upstream behaviour, so an upgrade that changes either is seen):
- With several objectives it drops every intermediate result, and with one it reports them to a
  study whose pruner is fixed to NopPruner. Early stopping is therefore Tune's job here (a stopper
  or scheduler, stopping.py); the searcher keeps each trial's perplexity trajectory as user attrs.
- It passes no constraints to Optuna. Ours sets each trial's constraint before telling it (Optuna 5's
  `Trial.set_constraint`: perplexity ratio over the budget's, feasible when <= 0), which TPE and
  NSGA-II rank by (constrained domination).
- It tells a stopped trial COMPLETE with its partial values, or, with several objectives and one of
  them (tok/s) not measured yet, fails inside `tell`, logs a warning and leaves the trial RUNNING in
  the study for good. Ours tells a stopped trial over budget COMPLETE with the worst values for what
  it never measured (an infeasible point NSGA-II can still count in a generation), a stopped trial
  within budget PRUNED, and an errored one FAIL.
"""
from __future__ import annotations

import threading

import optuna
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

from jobs.search.config import DIRECTION, SearchConfig

CONSTRAINT = "ppl_over_budget"


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna 5's NSGA-II holds a thread lock, and Tune pickles the searcher into its experiment
    state (to resume a run): the lock is left out and made afresh on unpickling."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def metric_key(objective: str) -> str:
    return f"obj_{objective}"


class BudgetAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records intermediate perplexity, sets the budget constraint, and tells
    stopped and unmeasured trials as above. `limit_ratio`: the budget as perplexity over fp32's;
    `worst`: each metric's value for a trial that never measured it."""

    def __init__(self, *args, limit_ratio: float, worst: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self._limit_ratio = limit_ratio
        self._worst = worst

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._ot_trials[trial_id].set_user_attr(f"ppl_ratio@{result['windows_done']}", result["ppl_ratio"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if error or not result or "ppl_ratio" not in result:
            return super().on_trial_complete(trial_id, None, error=True)
        trial = self._ot_trials[trial_id]
        excess = result["ppl_ratio"] - self._limit_ratio
        trial.set_constraint(CONSTRAINT, excess)
        trial.set_user_attr("final", bool(result.get("final")))
        values = [self._value(result, m) for m in self._metrics()]
        if result.get("final") or excess > 0:
            self._ot_study.tell(trial, values if isinstance(self.metric, list) else values[0])
        else:  # stopped by a scheduler while within budget: no verdict on it
            self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def _metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    def _value(self, result: dict, metric: str) -> float:
        value = result.get(metric)
        return self._worst[metric] if value is None else float(value)


def make_searcher(config: SearchConfig, seeds: list[dict], limit_ratio: float,
                  worst: dict[str, float]) -> Searcher:
    kind, options = config.searcher.kind, config.searcher
    if kind in ("random", "grid"):
        # Tune's default: random draws from the domains, or every combination of a grid space. Tune
        # applies max_concurrent_trials to a Searcher only, so this generator is given it itself.
        return BasicVariantGenerator(points_to_evaluate=seeds or None, random_state=options.seed,
                                     max_concurrent=config.concurrency)
    if kind == "optuna-tpe":
        sampler = optuna.samplers.TPESampler(seed=options.seed, multivariate=True,
                                             n_startup_trials=options.n_startup_trials)
    else:
        sampler = PicklableNSGAIISampler(population_size=options.population_size, seed=options.seed)
    metrics = [metric_key(o) for o in config.objectives]
    # OptunaSearch enqueues its points_to_evaluate as given; its parameter names are the flattened ones.
    seeds = [flatten_dict(point) for point in seeds]
    modes = [DIRECTION[o] for o in config.objectives]
    return BudgetAwareOptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        sampler=sampler, points_to_evaluate=seeds or None, limit_ratio=limit_ratio, worst=worst)

