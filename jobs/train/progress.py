"""A run's progress on Ray's metrics endpoint (names in cluster.metrics), recorded by rank 0, so
Prometheus, Grafana and the Ray dashboard's metrics follow a training job as it runs."""
from __future__ import annotations

import ray.train

from cluster import metrics as names


class TrainProgress:
    def __init__(self):
        context = ray.train.get_context()
        self.enabled = context.get_world_rank() == 0
        self.tags = {"run": context.get_experiment_name()}
        self.gauges = {spec.name: names.ray_metric(spec) for spec in names.TRAIN_METRICS} if self.enabled else {}

    def record(self, step_metrics: dict) -> None:
        if not self.enabled:
            return
        values = {names.TRAIN_STEP: step_metrics["step"], names.TRAIN_LOSS: step_metrics["loss"],
                  names.TRAIN_TOKENS_PER_SECOND: step_metrics["tokens_per_s"],
                  names.TRAIN_VALIDATION_PERPLEXITY: step_metrics.get("val_ppl")}
        for spec, value in values.items():
            if value is not None:
                self.gauges[spec.name].set(value, tags=self.tags)
