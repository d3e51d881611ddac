"""rayfoundry's Grafana dashboards, every query built from the metric names in cluster/metrics.py.

Serving: the engine's latencies, throughput, queues and caches per model and replica, the router's
decisions, and what Serve itself sees (replicas, HTTP errors such as back-pressure's 429). Training: what
rank 0 of each Ray Train run records (jobs/train/progress.py). Search: a Tune search's trials by state and
the best value of each objective so far (jobs/search/progress.py). Cluster: nodes, CPU, memory and Ray's
logical resources, from Ray's own metrics.
"""
from __future__ import annotations

from cluster import metrics as m
from cluster.dashboard_model import (QUANTILES, Dashboard, Panel, Query, Variable, gauge, per_second, quantile,
                                     ratio_of_rates, selector)


FILTERS = ("model", "replica")  # the Serving dashboard's variables
BY_MODEL = ("model",)
BY_REPLICA = ("model", "replica")


def _latency(title: str, spec: m.MetricSpec) -> Panel:
    queries = tuple(Query(quantile(q, spec, BY_MODEL, FILTERS), f"{{{{model}}}} p{round(q * 100)}")
                    for q in QUANTILES)
    return Panel(title, spec.description, queries, unit="s")


def _per_second(title: str, description: str, spec: m.MetricSpec, by: tuple[str, ...], **options) -> Panel:
    legend = " ".join(f"{{{{{label}}}}}" for label in by)
    return Panel(title, description, (Query(per_second(spec, by, FILTERS, **options), legend),), unit="reqps")


def _engine_panels() -> tuple[Panel, ...]:
    return (
        _per_second("Requests finished / s", "Requests that finished, per model.", m.END_TO_END_LATENCY, BY_MODEL,
                    suffix="_count"),
        _latency("Time to first token", m.TIME_TO_FIRST_TOKEN),
        _latency("Inter-token latency", m.INTER_TOKEN_LATENCY),
        _latency("End-to-end latency", m.END_TO_END_LATENCY),
        _latency("Queue time", m.QUEUE_TIME),
        Panel("Tokens / s", "Prompt tokens of finished requests and tokens generated, per model.", (
            Query(per_second(m.GENERATION_TOKENS, BY_MODEL, FILTERS), "{{model}} generated"),
            Query(per_second(m.PROMPT_TOKENS, BY_MODEL, FILTERS), "{{model}} prompt"))),
        Panel("Running and waiting", "Requests being computed and queued, per replica.", (
            Query(gauge(m.REQUESTS_RUNNING, BY_REPLICA, FILTERS), "{{replica}} running"),
            Query(gauge(m.REQUESTS_WAITING, BY_REPLICA, FILTERS), "{{replica}} waiting"))),
        Panel("KV cache usage", m.KV_CACHE_USAGE.description,
              (Query(gauge(m.KV_CACHE_USAGE, BY_REPLICA, FILTERS, how="max"), "{{replica}}"),), unit="percentunit"),
        Panel("Prefix-cache hit rate", "Prompt tokens found in the prefix cache / looked up: over the rate window, "
              "and since each replica started.", (
                  Query(ratio_of_rates(m.PREFIX_CACHE_HITS, m.PREFIX_CACHE_QUERIES, BY_REPLICA, FILTERS),
                        "{{replica}}"),
                  Query(gauge(m.PREFIX_CACHE_HIT_RATE, BY_REPLICA, FILTERS, how="max"), "{{replica}} since start")),
              unit="percentunit"),
        _per_second("Aborted requests / s", m.REQUESTS_ABORTED.description, m.REQUESTS_ABORTED, BY_REPLICA),
        _per_second("Preemptions / s", m.PREEMPTIONS.description, m.PREEMPTIONS, BY_REPLICA),
    )


def _router_and_serve_panels() -> tuple[Panel, ...]:
    return (
        _per_second("Router decisions / s", "kv_aware's decisions by reason.", m.ROUTER_DECISIONS,
                    ("model", "reason")),
        Panel("Router: matched prefix", "Prompt tokens the chosen replica was believed to hold / prompt tokens "
              "routed.", (Query(ratio_of_rates(m.ROUTER_MATCHED_TOKENS, m.ROUTER_PROMPT_TOKENS, BY_MODEL, FILTERS),
                                "{{model}}"),), unit="percentunit"),
        _per_second("HTTP errors / s", m.SERVE_HTTP_ERRORS.description, m.SERVE_HTTP_ERRORS,
                    ("application", "error_code")),
        Panel("Replicas", m.SERVE_REPLICAS_HEALTHY.description,
              (Query(gauge(m.SERVE_REPLICAS_HEALTHY, ("application", "deployment")), "{{deployment}}"),)),
    )


def serving() -> Dashboard:
    return Dashboard(
        uid="rayfoundry-serving", title="rayfoundry / Serving",
        description="The engine, the router and Serve, per model and replica.",
        panels=_engine_panels() + _router_and_serve_panels(),
        variables=(Variable("model", "Model", m.REQUESTS_RUNNING),
                   Variable("replica", "Replica", m.REQUESTS_RUNNING, depends_on=("model",))))


BY_RUN = ("run",)


def _per_run(title: str, spec: m.MetricSpec) -> Panel:
    return Panel(title, spec.description, (Query(gauge(spec, BY_RUN, variables=BY_RUN, how="max"), "{{run}}"),))


def training() -> Dashboard:
    return Dashboard(
        uid="rayfoundry-training", title="rayfoundry / Training",
        description="QAT and distillation runs on Ray Train, per run.",
        panels=(_per_run("Loss", m.TRAIN_LOSS), _per_run("Tokens / s", m.TRAIN_TOKENS_PER_SECOND),
                _per_run("Validation perplexity", m.TRAIN_VALIDATION_PERPLEXITY), _per_run("Step", m.TRAIN_STEP)),
        variables=(Variable("run", "Run", m.TRAIN_STEP),))


BY_SEARCH = ("search",)


def search() -> Dashboard:
    return Dashboard(
        uid="rayfoundry-search", title="rayfoundry / Search",
        description="Compression searches on Ray Tune, per search.",
        panels=(
            Panel("Trials by state", m.SEARCH_TRIALS.description,
                  (Query(gauge(m.SEARCH_TRIALS, ("search", "state"), BY_SEARCH, how="max"), "{{search}} {{state}}"),)),
            Panel("Best objective so far", m.SEARCH_BEST_OBJECTIVE.description,
                  (Query(gauge(m.SEARCH_BEST_OBJECTIVE, ("search", "objective"), BY_SEARCH, how="max"),
                         "{{search}} {{objective}}"),)),
        ),
        variables=(Variable("search", "Search", m.SEARCH_TRIALS),))


BY_NODE = ("instance",)


def _logical(resource: str, unit: str = "short", none_is_zero: bool = False) -> Panel:
    """Ray's logical `resource`, used and in all. `none_is_zero`: a cluster without the resource (GPUs on
    CPU nodes) shows 0 rather than no data; the CPU panel's series prove the metric's name."""
    used = gauge(m.CLUSTER_RESOURCES, (), Name=resource, State="USED")
    total = f"sum({selector(m.CLUSTER_RESOURCES, Name=resource)})"
    if none_is_zero:
        used, total = f"{used} or vector(0)", f"{total} or vector(0)"
    return Panel(f"Logical {resource}: used and total", f"Ray's {resource} resource, summed over the nodes.",
                 (Query(used, "used"), Query(total, "total")), unit=unit)


def ray_cluster() -> Dashboard:
    return Dashboard(
        uid="rayfoundry-cluster", title="rayfoundry / Cluster",
        description="Nodes and their resources, as Ray's metrics agents report them.",
        panels=(
            Panel("Nodes", "Nodes whose metrics agent reports.", (Query(f"count({selector(m.NODE_CPU_COUNT)})",
                                                                        "nodes"),)),
            Panel("CPU utilization", m.NODE_CPU_UTILIZATION.description,
                  (Query(gauge(m.NODE_CPU_UTILIZATION, BY_NODE, how="max"), "{{instance}}"),), unit="percent"),
            Panel("Memory used", "Memory in use on each node and on the whole cluster.", (
                Query(gauge(m.NODE_MEMORY_USED, BY_NODE), "{{instance}}"),
                Query(f"sum({selector(m.NODE_MEMORY_TOTAL)})", "total")), unit="bytes"),
            _logical("CPU"), _logical("GPU", none_is_zero=True), _logical("memory", unit="bytes"),
        ))


def all_dashboards() -> list[Dashboard]:
    return [serving(), training(), search(), ray_cluster()]
