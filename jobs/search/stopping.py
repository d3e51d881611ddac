"""Early stopping: a trial's perplexity is reported after each batch of windows, against the
uncompressed model's on the same windows (`ppl_ratio`), so a hopeless trial ends after a few.

The default, `budget`, stops a trial whose ratio is over the budget by more than a margin: it never
stops a trial that could end within budget unless the first windows mislead by more than the margin.
ASHA and the median rule rank trials by that ratio alone; with several objectives they stop cheap,
slightly worse trials that belong on the front, which is why they are not the default.
"""
from __future__ import annotations

from ray import tune
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

from jobs.search.config import EarlyStopConfig


class BudgetStopper(tune.Stopper):
    def __init__(self, limit_ratio: float, options: EarlyStopConfig):
        self.limit_ratio = limit_ratio
        self.options = options

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("final") or result.get("windows_done", 0) < self.options.grace_windows:
            return False
        if result.get("is_seed") and self.options.spare_seeds:
            return False
        return result["ppl_ratio"] > self.limit_ratio * (1 + self.options.margin)

    def stop_all(self) -> bool:
        return False


def make_stopping(options: EarlyStopConfig, limit_ratio: float,
                  total_windows: int) -> tuple[tune.Stopper | None, TrialScheduler | None]:
    """(stopper, scheduler) for Tune's RunConfig and TuneConfig."""
    if options.kind == "budget":
        return BudgetStopper(limit_ratio, options), None
    if options.kind == "asha":
        return None, ASHAScheduler(time_attr="windows_done", metric="ppl_ratio", mode="min",
                                   grace_period=options.grace_windows, max_t=total_windows,
                                   reduction_factor=options.reduction_factor)
    if options.kind == "median":
        return None, MedianStoppingRule(time_attr="windows_done", metric="ppl_ratio", mode="min",
                                        grace_period=options.grace_windows, min_samples_required=3)
    return None, None
