"""The engine's measurements, recorded against the metric names of cluster.metrics.

The engine only calls `record(spec, value)`; where the values go is the sink's business: kept
in memory (tests, benchmarks) or exported through Ray (a Serve replica passes RayMetricsSink).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from cluster import metrics as names
from cluster.metrics import MetricSpec
from serve_apps.engine.request import Request


class InMemorySink:
    """Every histogram observation, counter total and latest gauge value."""

    def __init__(self):
        self.observations: dict[str, list[float]] = defaultdict(list)
        self.totals: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, float] = {}

    def record(self, spec: MetricSpec, value: float) -> None:
        if spec.kind == "histogram":
            self.observations[spec.name].append(value)
        elif spec.kind == "counter":
            self.totals[spec.name] += value
        else:
            self.gauges[spec.name] = value


class RayMetricsSink:
    """Exports through ray.util.metrics, tagged with the model id and the Serve replica."""

    def __init__(self, model: str, replica: str = ""):
        self.tags = {"model": model, "replica": replica}
        self._metrics = {spec.name: names.ray_metric(spec) for spec in names.ENGINE_METRICS}

    def record(self, spec: MetricSpec, value: float) -> None:
        metric = self._metrics[spec.name]
        if spec.kind == "histogram":
            metric.observe(value, tags=self.tags)
        elif spec.kind == "counter":
            names.increment(metric, value, self.tags)
        else:
            metric.set(value, tags=self.tags)


@dataclass(frozen=True)
class StepStats:
    """The engine after a step: its queues and cache now, and its counters since it started."""

    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int


class EngineMetrics:
    def __init__(self, sink=None):
        self.sink = sink or InMemorySink()
        self._last_token_time: dict[str, float] = {}
        self._reported = StepStats(0, 0, 0.0, 0, 0, 0)  # the counters as last recorded

    def on_token(self, request: Request, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        previous = self._last_token_time.get(request.request_id)
        if previous is None:
            self.sink.record(names.TIME_TO_FIRST_TOKEN, now - request.arrival_time)
        else:
            self.sink.record(names.INTER_TOKEN_LATENCY, now - previous)
        self._last_token_time[request.request_id] = now
        self.sink.record(names.GENERATION_TOKENS, 1)

    def on_finish(self, request: Request, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_token_time.pop(request.request_id, None)
        self.sink.record(names.END_TO_END_LATENCY, now - request.arrival_time)
        if request.first_scheduled_time is not None:
            self.sink.record(names.QUEUE_TIME, request.first_scheduled_time - request.arrival_time)
        self.sink.record(names.PROMPT_TOKENS, request.num_prompt_tokens)

    def on_abort(self, request: Request) -> None:
        self._last_token_time.pop(request.request_id, None)
        self.sink.record(names.REQUESTS_ABORTED, 1)

    def on_step(self, stats: StepStats) -> None:
        self.sink.record(names.REQUESTS_RUNNING, stats.num_running)
        self.sink.record(names.REQUESTS_WAITING, stats.num_waiting)
        self.sink.record(names.KV_CACHE_USAGE, stats.kv_usage)
        # Counters are recorded as increments: what was added since the last step.
        last, self._reported = self._reported, stats
        self.sink.record(names.PREFIX_CACHE_QUERIES, stats.prefix_queried_tokens - last.prefix_queried_tokens)
        self.sink.record(names.PREFIX_CACHE_HITS, stats.prefix_hit_tokens - last.prefix_hit_tokens)
        self.sink.record(names.PREEMPTIONS, stats.num_preemptions - last.num_preemptions)
        if stats.prefix_queried_tokens:
            self.sink.record(names.PREFIX_CACHE_HIT_RATE, stats.prefix_hit_tokens / stats.prefix_queried_tokens)
