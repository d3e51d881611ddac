"""What Optuna is told about each trial, driving the searcher as Tune does (suggest, results,
complete). The upstream OptunaSearch's behaviour that ours corrects is pinned too, so a Ray upgrade
that changes it shows here."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from ray import cloudpickle, tune
from ray.tune.search.optuna import OptunaSearch

from jobs.search.config import SearchConfig
from jobs.search.searchers import CONSTRAINT, BudgetAwareOptunaSearch, make_searcher

SPACE = {"g": {"bits": tune.choice([4, 8])}}
MULTI = {"metric": ["obj_ppl", "obj_decode_b1"], "mode": ["min", "max"]}
WORST = {"obj_ppl": 1e9, "obj_decode_b1": 0.0}


def searcher(cls=BudgetAwareOptunaSearch, metric=MULTI["metric"], mode=MULTI["mode"], **extra):
    found = cls(metric=metric, mode=mode, sampler=optuna.samplers.RandomSampler(seed=0), **extra)
    found.set_search_properties(None, None, SPACE)
    return found


def ours(**kw):
    return searcher(limit_ratio=1.05, worst=WORST, **kw)


def result(ratio, final, speed=None, windows=8):
    return {"ppl_ratio": ratio, "windows_done": windows, "final": final, "obj_ppl": 10 * ratio,
            "obj_decode_b1": speed, "training_iteration": windows // 4}


def told(search, trial_id):
    return search._ot_study.get_trials(deepcopy=False)[list(search._ot_trials).index(trial_id)]


def test_a_finished_trial_within_budget_is_complete_and_feasible():
    search = ours()
    search.suggest("t1")
    search.on_trial_result("t1", result(1.03, False, windows=4))
    search.on_trial_complete("t1", result(1.02, True, speed=55.0))
    trial = told(search, "t1")
    assert trial.state == TrialState.COMPLETE and trial.values == [10.2, 55.0]
    assert trial.constraints[CONSTRAINT] == pytest.approx(1.02 - 1.05)
    assert trial.user_attrs["ppl_ratio@4"] == 1.03  # intermediate results are kept


def test_a_trial_stopped_over_budget_is_an_infeasible_complete_point_with_the_worst_speed():
    search = ours()
    search.suggest("t1")
    search.on_trial_complete("t1", result(1.4, False, windows=4))
    trial = told(search, "t1")
    assert trial.state == TrialState.COMPLETE and trial.values == [14.0, 0.0]
    assert trial.constraints[CONSTRAINT] == pytest.approx(1.4 - 1.05) and trial.constraints[CONSTRAINT] > 0


def test_a_trial_stopped_within_budget_is_pruned_and_an_error_fails():
    search = ours()
    search.suggest("t1")
    search.suggest("t2")
    search.on_trial_complete("t1", result(1.01, False, windows=4))
    search.on_trial_complete("t2", None, error=True)
    assert told(search, "t1").state == TrialState.PRUNED
    assert told(search, "t2").state == TrialState.FAIL


def test_one_objective_gets_a_number_too():
    search = ours(metric="obj_decode_b1", mode="max")
    search.suggest("t1")
    search.on_trial_complete("t1", result(1.3, False))
    assert told(search, "t1").values == [0.0]


def test_upstream_leaves_a_stopped_multi_objective_trial_running():
    """Ray 2.60's OptunaSearch: tok/s not measured yet (None) makes `tell` fail; it only logs."""
    search = searcher(OptunaSearch)
    search.suggest("t1")
    search.on_trial_complete("t1", result(1.4, False))
    assert told(search, "t1").state == TrialState.RUNNING


def test_upstream_tells_a_stopped_single_objective_trial_complete_with_partial_values():
    search = searcher(OptunaSearch, metric="obj_ppl", mode="min")
    search.suggest("t1")
    search.on_trial_complete("t1", result(1.4, False, windows=4))
    trial = told(search, "t1")
    assert trial.state == TrialState.COMPLETE and trial.values == [14.0] and trial.constraints == {}


@pytest.mark.parametrize("kind", ["optuna-tpe", "optuna-nsga2", "random", "grid"])
def test_every_searcher_survives_tunes_pickling(kind):
    """Tune pickles the searcher into its experiment state when the run starts and to resume it
    (Optuna 5's NSGA-II sampler holds a thread lock)."""
    config = SearchConfig.model_validate({"name": "p", "model": "m", "budget": {"max_ppl_increase": 0.05},
                                          "num_trials": 4, "searcher": {"kind": kind}})
    searcher = make_searcher(config, [{"g": {"bits": 8}}], 1.05, WORST)
    searcher.set_search_properties(None, None, SPACE)
    again = cloudpickle.loads(cloudpickle.dumps(searcher))
    assert type(again) is type(searcher)
    if kind.startswith("optuna"):
        assert again.suggest("t1") == {"g": {"bits": 8}}  # the seed point comes first, after unpickling too
