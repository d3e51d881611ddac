"""A search's progress on Ray's metrics endpoint (names in cluster.metrics), recorded by its driver as
Tune's trials start and end: trials by state, and the best value of each objective so far among the
finished trials within the quality budget. The Search dashboard draws both."""
from __future__ import annotations

from collections import Counter

from ray import tune

from cluster import metrics as names
from jobs.search.config import DIRECTION
from jobs.search.searchers import metric_key

STATES = ("PENDING", "RUNNING", "PAUSED", "TERMINATED", "ERROR")


class SearchProgress(tune.Callback):
    def __init__(self, search: str, objectives: list[str], limit_ratio: float):
        self.search, self.objectives, self.limit_ratio = search, objectives, limit_ratio
        self.best: dict[str, float] = {}
        self._gauges: dict | None = None  # made in the driver on first use: this object is pickled with Tune's state

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_gauges": None}

    def _gauge(self, spec: names.MetricSpec):
        if self._gauges is None:
            self._gauges = {s.name: names.ray_metric(s) for s in names.SEARCH_METRICS}
        return self._gauges[spec.name]

    def _record_states(self, trials: list) -> None:
        counts = Counter(trial.status for trial in trials)
        for state in STATES:  # a state no trial is in any more reads 0, not its last count
            self._gauge(names.SEARCH_TRIALS).set(counts.get(state, 0), tags={"search": self.search, "state": state})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record_states(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("final") and result.get("ppl_ratio") is not None and result["ppl_ratio"] <= self.limit_ratio:
            for objective in self.objectives:
                self._improve(objective, result.get(metric_key(objective)))
        self._record_states(trials)

    def _improve(self, objective: str, value: float | None) -> None:
        if value is None:
            return
        better = min if DIRECTION[objective] == "min" else max
        self.best[objective] = better(value, self.best.get(objective, value))
        self._gauge(names.SEARCH_BEST_OBJECTIVE).set(self.best[objective],
                                                     tags={"search": self.search, "objective": objective})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record_states(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record_states(trials)

    def on_experiment_end(self, trials, **info):
        self._record_states(trials)
