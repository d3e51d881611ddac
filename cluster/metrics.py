"""Metric names, defined once: the engine and router export them, the dashboards read them.

Each is a MetricSpec; `ray_metric` turns one into the ray.util.metrics object a Serve replica
exports, which Ray publishes on its Prometheus endpoint with a `ray_` prefix (`series` gives that name).
The metrics of Ray itself that the dashboards read are listed here too, so that no name is typed twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    boundaries: tuple[float, ...] = ()
    tag_keys: tuple[str, ...] = ("model", "replica")
    exported_by: Literal["rayfoundry", "ray"] = "rayfoundry"


def series(spec: MetricSpec, suffix: str = "") -> str:
    """The name Prometheus knows `spec` by: Ray prefixes the metrics it publishes for us with `ray_`;
    `suffix` picks a histogram's series (`_bucket`, `_sum`, `_count`)."""
    name = spec.name if spec.exported_by == "ray" else f"ray_{spec.name}"
    return name + suffix


def _latency(name: str, description: str) -> MetricSpec:
    return MetricSpec(name, "histogram", description, LATENCY_BUCKETS_S)


TIME_TO_FIRST_TOKEN = _latency("rayfoundry_engine_time_to_first_token_seconds", "Arrival to first output token.")
INTER_TOKEN_LATENCY = _latency("rayfoundry_engine_inter_token_latency_seconds", "Between consecutive output tokens.")
END_TO_END_LATENCY = _latency("rayfoundry_engine_e2e_latency_seconds", "Arrival to finish.")
QUEUE_TIME = _latency("rayfoundry_engine_queue_time_seconds", "Arrival to first scheduled.")
PROMPT_TOKENS = MetricSpec("rayfoundry_engine_prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
GENERATION_TOKENS = MetricSpec("rayfoundry_engine_generation_tokens_total", "counter", "Tokens generated.")
REQUESTS_RUNNING = MetricSpec("rayfoundry_engine_requests_running", "gauge", "Requests being computed.")
REQUESTS_WAITING = MetricSpec("rayfoundry_engine_requests_waiting", "gauge", "Requests queued.")
KV_CACHE_USAGE = MetricSpec("rayfoundry_engine_kv_cache_usage_ratio", "gauge", "Fraction of KV blocks in use.")
PREFIX_CACHE_QUERIES = MetricSpec("rayfoundry_engine_prefix_cache_queried_tokens_total", "counter",
                                  "Prompt tokens looked up in the prefix cache.")
PREFIX_CACHE_HITS = MetricSpec("rayfoundry_engine_prefix_cache_hit_tokens_total", "counter",
                               "Prompt tokens found in the prefix cache.")
PREFIX_CACHE_HIT_RATE = MetricSpec("rayfoundry_engine_prefix_cache_hit_rate", "gauge",
                                   "Prompt tokens found in the prefix cache / looked up, since the replica started.")
PREEMPTIONS = MetricSpec("rayfoundry_engine_preemptions_total", "counter", "Requests preempted for recompute.")
REQUESTS_ABORTED = MetricSpec("rayfoundry_engine_aborted_requests_total", "counter",
                              "Requests aborted before they finished (the client went away).")

ENGINE_METRICS = (
    TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, END_TO_END_LATENCY, QUEUE_TIME, PROMPT_TOKENS, GENERATION_TOKENS,
    REQUESTS_RUNNING, REQUESTS_WAITING, KV_CACHE_USAGE, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS,
    PREFIX_CACHE_HIT_RATE, PREEMPTIONS, REQUESTS_ABORTED,
)

# Recorded by the kv_aware request router (in the ingress): one per decision, by its reason
# (prefix, least_loaded, pow2) and the replica chosen. A request that finds every replica full is
# decided again when it retries.
ROUTER_DECISIONS = MetricSpec("rayfoundry_router_decisions_total", "counter", "Routing decisions of kv_aware.",
                              tag_keys=("model", "reason", "replica"))
ROUTER_MATCHED_TOKENS = MetricSpec("rayfoundry_router_matched_prefix_tokens_total", "counter",
                                   "Prompt tokens the chosen replica was believed to hold.",
                                   tag_keys=("model", "replica"))
ROUTER_PROMPT_TOKENS = MetricSpec("rayfoundry_router_prompt_tokens_total", "counter",
                                  "Prompt tokens of the requests routed.", tag_keys=("model", "replica"))
ROUTER_METRICS = (ROUTER_DECISIONS, ROUTER_MATCHED_TOKENS, ROUTER_PROMPT_TOKENS)


# Recorded by rank 0 of a Ray Train run (jobs/train), tagged with the run's name.
_TRAIN_TAGS = ("run",)
TRAIN_STEP = MetricSpec("rayfoundry_train_step", "gauge", "Optimizer steps done.", tag_keys=_TRAIN_TAGS)
TRAIN_LOSS = MetricSpec("rayfoundry_train_loss", "gauge", "Training loss of the last step.", tag_keys=_TRAIN_TAGS)
TRAIN_TOKENS_PER_SECOND = MetricSpec("rayfoundry_train_tokens_per_second", "gauge",
                                     "Tokens trained per second over all workers, last step.", tag_keys=_TRAIN_TAGS)
TRAIN_VALIDATION_PERPLEXITY = MetricSpec("rayfoundry_train_validation_perplexity", "gauge",
                                         "Perplexity on the validation split, last measured.", tag_keys=_TRAIN_TAGS)
TRAIN_METRICS = (TRAIN_STEP, TRAIN_LOSS, TRAIN_TOKENS_PER_SECOND, TRAIN_VALIDATION_PERPLEXITY)

# Recorded by a search's driver (jobs/search) as Tune's trials start and end, tagged with the search's name.
SEARCH_TRIALS = MetricSpec("rayfoundry_search_trials", "gauge",
                           "Trials of a search by Tune's state: PENDING, RUNNING, TERMINATED, ERROR.",
                           tag_keys=("search", "state"))
SEARCH_BEST_OBJECTIVE = MetricSpec("rayfoundry_search_best_objective", "gauge",
                                   "Best value so far of each objective among finished trials within the budget.",
                                   tag_keys=("search", "objective"))
SEARCH_METRICS = (SEARCH_TRIALS, SEARCH_BEST_OBJECTIVE)



# Exported by Ray itself: its metrics agent on every node, Serve's controller, proxies and replicas.
def _ray(name: str, kind: Literal["counter", "gauge"], description: str, *tag_keys: str) -> MetricSpec:
    return MetricSpec(name, kind, description, tag_keys=tag_keys, exported_by="ray")


NODE_CPU_COUNT = _ray("ray_node_cpu_count", "gauge", "Logical CPU cores of a node.", "instance")
NODE_CPU_UTILIZATION = _ray("ray_node_cpu_utilization", "gauge", "CPU use of a node, percent.", "instance")
NODE_MEMORY_USED = _ray("ray_node_mem_used", "gauge", "Memory in use on a node, bytes.", "instance")
NODE_MEMORY_TOTAL = _ray("ray_node_mem_total", "gauge", "Memory of a node, bytes.", "instance")
CLUSTER_RESOURCES = _ray("ray_resources", "gauge", "Logical resources of a node (Name: CPU, GPU, memory), "
                         "by State: USED or AVAILABLE.", "Name", "State", "instance")
SERVE_REPLICAS_HEALTHY = _ray("ray_serve_deployment_replica_healthy", "gauge", "1 for each healthy replica.",
                              "application", "deployment", "replica")
SERVE_HTTP_REQUESTS = _ray("ray_serve_num_http_requests_total", "counter", "HTTP requests through Serve's proxy.",
                           "application", "route", "method", "status_code")
SERVE_HTTP_ERRORS = _ray("ray_serve_num_http_error_requests_total", "counter",
                         "HTTP requests answered with an error, by error_code (429: shed by back-pressure).",
                         "application", "route", "error_code")
RAY_METRICS = (NODE_CPU_COUNT, NODE_CPU_UTILIZATION, NODE_MEMORY_USED, NODE_MEMORY_TOTAL, CLUSTER_RESOURCES,
               SERVE_REPLICAS_HEALTHY, SERVE_HTTP_REQUESTS, SERVE_HTTP_ERRORS)


def ray_metric(spec: MetricSpec):
    """The ray.util.metrics object for `spec` (create once per process and reuse)."""
    from ray.util import metrics

    if spec.exported_by != "rayfoundry":
        raise ValueError(f"{spec.name} is exported by Ray itself")

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tag_keys)


def increment(counter, value: float, tags: dict[str, str]) -> None:
    """Add to a ray.util.metrics Counter; Ray refuses increments of zero, which mean nothing anyway."""
    if value > 0:
        counter.inc(value, tags=tags)
