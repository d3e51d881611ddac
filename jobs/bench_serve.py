"""Benchmark the Serve application over HTTP, each request router in turn, in one run.

    python -m jobs.bench_serve [--config configs/jobs/bench_serve.yaml]

For every policy in `policies`: deploy the app (fresh replicas, cold caches), warm it up with
unrelated prompts, send the workload (serve_apps' OpenAI chat endpoint, streamed), take it down.
Reports TTFT, inter-token and end-to-end latency (p50/p90/p99), throughput and the prefix-cache
hit rate (cached ÷ prompt tokens, as the server's usage reports them), and kv_aware's ratios
against the others. Stores results.parquet, results.md and a PNG as a result artifact.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster import auth
from cluster.config import StrictConfig, load_config
from cluster.errors import UserError, reports_user_errors
from cluster.local_cluster import HOST
from cluster.store import Store
from jobs.bench.report import markdown_table
from jobs.bench.serve_load import run_load
from jobs.bench.serve_report import COLUMNS, ratios, store_serve_results, summarize
from jobs.bench.serve_workloads import WorkloadConfig, build_sessions, word_list
from jobs.models.load import model_dir
from serve_apps.engine.config import EngineConfig
from serve_apps.routing.kv_aware_state import DEFAULT_MAX_IMBALANCE

Policy = Literal["kv_aware", "ray_prefix", "pow2", "round_robin"]
MODEL_ID = "bench"


class BenchServeConfig(StrictConfig):
    model: str = "smollm2-135m-instruct"
    policies: list[Policy] = Field(default_factory=lambda: ["kv_aware", "ray_prefix", "pow2", "round_robin"],
                                   min_length=1)
    replicas: int = Field(2, ge=1)
    num_cpus_per_replica: float = Field(1.0, gt=0)
    max_ongoing_requests: int = Field(64, ge=1, description="per replica")
    max_imbalance: int = Field(DEFAULT_MAX_IMBALANCE, ge=0, description="kv_aware's load-imbalance threshold")
    engine: EngineConfig = EngineConfig()
    workload: WorkloadConfig = WorkloadConfig()
    max_tokens: int = Field(32, ge=1, description="output tokens per request (EOS ignored)")
    concurrency: int | None = Field(16, ge=1, description="requests in flight; or set request_rate")
    request_rate: float | None = Field(None, gt=0, description="Poisson arrivals per second instead")
    ray_address: str = Field("local", description='"local": a private Ray on this machine; or an address')
    num_cpus: float | None = Field(None, gt=0, description="logical CPUs of the private Ray (default: enough)")
    store: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_arrival_process(cls, data):
        if isinstance(data, dict) and data.get("request_rate") is not None:
            if data.get("concurrency") is not None:
                raise ValueError("set concurrency or request_rate, not both")
            data = {**data, "concurrency": None}  # Poisson arrivals replace the default fixed concurrency
        return data

    @model_validator(mode="after")
    def _some_arrival_process(self):
        if self.concurrency is None and self.request_rate is None:
            raise ValueError("set concurrency or request_rate")
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _start_ray(config: BenchServeConfig) -> str:
    """Ray and Serve (HTTP on a free loopback port); returns the base URL."""
    import ray
    from ray import serve

    if config.ray_address == "local":
        auth.for_private_cluster()
        num_cpus = config.num_cpus or config.replicas * config.num_cpus_per_replica + 1
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=config.ray_address, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": HOST, "port": port})
    return f"http://{HOST}:{port}"


def _app_args(config: BenchServeConfig, policy: Policy, model_path: Path) -> dict:
    return {"models": [{
        "model_id": MODEL_ID, "model": str(model_path), "engine": config.engine.model_dump(),
        "num_replicas": config.replicas, "num_cpus_per_replica": config.num_cpus_per_replica,
        "max_ongoing_requests": config.max_ongoing_requests, "max_queued_requests": -1,
        "router": policy, "max_imbalance": config.max_imbalance}], "ingress_num_cpus": 0}


def run_policy(config: BenchServeConfig, policy: Policy, model_path: Path, base_url: str, sessions, words) -> dict:
    from ray import serve

    from serve_apps.app import build_app

    started = time.perf_counter()
    serve.run(build_app(_app_args(config, policy, model_path)), name="bench", route_prefix="/")
    print(f"[{policy}] deployed {config.replicas} replicas in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    warmup = build_sessions(WorkloadConfig(kind="random", requests=2 * config.replicas, system_prompt_words=16,
                                           seed=10_000), words)
    asyncio.run(run_load(base_url, MODEL_ID, warmup, 4, concurrency=len(warmup)))
    results, wall = asyncio.run(run_load(base_url, MODEL_ID, sessions, config.max_tokens,
                                         concurrency=config.concurrency, request_rate=config.request_rate,
                                         seed=config.workload.seed))
    serve.delete("bench")
    row = summarize(policy, results, wall)
    print(f"[{policy}] {row['ok']}/{row['requests']} ok in {wall:.0f}s: {row['output_tokens_per_s']:.1f} tok/s, "
          f"prefix hit rate {row['prefix_hit_rate']:.2f}", file=sys.stderr)
    return row


@reports_user_errors("bench_serve")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML with BenchServeConfig fields (default: the defaults)")
    args = parser.parse_args(argv)
    config = load_config(BenchServeConfig, args.config) if args.config else BenchServeConfig()
    store = Store(config.store)
    model_path = model_dir(config.model, store)
    from transformers import AutoTokenizer

    words = word_list(AutoTokenizer.from_pretrained(model_path))
    sessions = build_sessions(config.workload, words)
    base_url = _start_ray(config)
    try:
        rows = [run_policy(config, policy, model_path, base_url, sessions, words) for policy in config.policies]
    finally:
        _stop_ray()
    if not any(row["ok"] for row in rows):
        raise UserError("no request succeeded; see the replica logs under /tmp/ray/session_latest/logs/serve/")
    arrival = f"{config.concurrency} concurrent" if config.concurrency else f"Poisson {config.request_rate}/s"
    title = (f"{config.model}: {config.replicas} replicas, {config.workload.kind}, "
             f"{config.workload.requests} requests, {arrival}")
    report = "\n\n".join([title, markdown_table(rows, COLUMNS),
                          markdown_table(ratios(rows), ["measure", "peer", "ratio"])])
    print(report)
    print(f"\nresults: {store_serve_results(rows, report, title, store)}")
    return 0


def _stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
