"""Serve autoscaling on an autoscaling cluster, end to end on this machine.

    python -m jobs.bench_autoscale [--config configs/jobs/bench_autoscale.yaml]

Starts the fake multi-node cluster of cluster/fake-multinode.yaml (its own ports, token
authentication and API keys on), deploys an autoscaling app whose replicas each want a (logical)
GPU, so none fits on the head, and sends it HTTP load. Serve adds replicas, their placement waits,
the autoscaler launches nodes, the replicas start there and take traffic; after the load, replicas
go back to the minimum and idle nodes away. Samples nodes, replicas and requests in flight over
time; stores the timeline, every request (with the node of the replica that served it) and a PNG.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from cluster import auth
from cluster.config import StrictConfig, load_config
from cluster.errors import UserError, reports_user_errors
from cluster.fake_cluster import FakeCluster, free_port, is_fake
from cluster.local_cluster import HOST
from cluster.store import Store
from jobs.bench.autoscale_report import (SUMMARY_COLUMNS, request_rows, store_autoscale_results, summarize,
                                         timeline_rows)
from jobs.bench.cluster_timeline import ClusterTimeline, worker_nodes
from jobs.bench.report import markdown_table
from jobs.bench.serve_load import run_load
from jobs.bench.serve_workloads import WorkloadConfig, build_sessions, word_list
from jobs.models.load import model_dir
from serve_apps.app import AutoscalingConfig
from serve_apps.engine.config import EngineConfig

APP, MODEL_ID = "autoscale", "bench"
DEPLOYMENT = f"LLMServer:{MODEL_ID}"


class BenchAutoscaleConfig(StrictConfig):
    model: str = "smollm2-135m-instruct"
    cluster: str = Field("cluster/fake-multinode.yaml", description="a fake multi-node cluster YAML")
    idle_timeout_minutes: float | None = Field(None, gt=0, description="replaces the YAML's")
    tensor_parallel_size: int = Field(1, ge=1)
    placement_strategy: Literal["PACK", "SPREAD"] = Field("PACK", description="a tp>1 replica spans nodes")
    router: Literal["kv_aware", "pow2", "round_robin", "ray_prefix"] = Field(
        "pow2", description="unrelated prompts share only the chat template: spread them by load")
    gpus_per_rank: float = Field(1, ge=0, description="logical GPUs each rank asks for: 1 keeps replicas off the head")
    engine: EngineConfig = EngineConfig(kv_cache_memory_gib=0.25, max_num_seqs=16)
    autoscaling: AutoscalingConfig = AutoscalingConfig(
        min_replicas=0, max_replicas=3, target_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=10,
        look_back_period_s=12)
    workload: WorkloadConfig = WorkloadConfig(kind="random", requests=5000, system_prompt_words=32)
    max_tokens: int = Field(32, ge=1)
    concurrency: int = Field(8, ge=1, description="requests in flight during the load")
    load_s: float = Field(150, gt=0, description="how long requests keep coming (at most workload.requests)")
    settle_timeout_s: float = Field(300, gt=0, description="after the load: the wait for the minimum")
    sample_period_s: float = Field(0.5, gt=0)
    store: str | None = None


def fake_cluster_yaml(config: BenchAutoscaleConfig, folder: Path) -> Path:
    """The cluster YAML with a free GCS port (and the idle timeout asked for), written to `folder`."""
    data = yaml.safe_load(Path(config.cluster).read_text())
    if not is_fake(data):
        raise UserError(f"{config.cluster} is not a fake multi-node cluster YAML")
    data["provider"]["gcs_address"] = f"{HOST}:{free_port()}"
    if config.idle_timeout_minutes is not None:
        data["idle_timeout_minutes"] = config.idle_timeout_minutes
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _app_args(config: BenchAutoscaleConfig, model_path: Path) -> dict:
    engine = config.engine.model_copy(update={
        "tensor_parallel_size": config.tensor_parallel_size, "num_gpus_per_worker": config.gpus_per_rank,
        "placement_strategy": config.placement_strategy})
    return {"models": [{"model_id": MODEL_ID, "model": str(model_path), "engine": engine.model_dump(),
                        "autoscaling": config.autoscaling.model_dump(), "check_placement": False,
                        "router": config.router,
                        "max_queued_requests": -1}], "ingress_num_cpus": 0}


def _deploy(config: BenchAutoscaleConfig, model_path: Path) -> str:
    """Serve with one HTTP proxy, on the head (every fake node shares this machine's ports)."""
    from ray import serve

    from serve_apps.app import build_app

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": HOST, "port": port})
    serve.run(build_app(_app_args(config, model_path)), name=APP, route_prefix="/")
    return f"http://{HOST}:{port}"


def _settle(timeline: ClusterTimeline, min_replicas: int, timeout_s: float) -> None:
    """Wait until the deployment is back to its minimum and no worker node is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = timeline.samples[-1] if timeline.samples else {}
        if last.get("worker_nodes", 1) == 0 and last.get("replicas_running", 0) <= min_replicas:
            return
        time.sleep(timeline.period_s)
    print(f"not back to the minimum after {timeout_s:.0f}s", file=sys.stderr)


def run_loop(config: BenchAutoscaleConfig, model_path: Path, sessions, cluster: FakeCluster) -> tuple:
    """Deploy, load, settle on a started cluster; returns (samples, results, replica->node, t0, load end)."""
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        if worker_nodes():
            raise UserError("the fake cluster already has worker nodes; the loop starts from none")
        base_url = _deploy(config, model_path)
        timeline = ClusterTimeline(APP, DEPLOYMENT, cluster.dashboard_url, config.sample_period_s)
        timeline.start()
        t0 = time.perf_counter()
        results, _ = asyncio.run(run_load(base_url, MODEL_ID, sessions, config.max_tokens,
                                          concurrency=config.concurrency, api_key=auth.api_keys()[0],
                                          stop_after_s=config.load_s))
        load_end = time.perf_counter()
        print(f"load done in {load_end - t0:.0f}s; waiting for the cluster to scale down", file=sys.stderr)
        _settle(timeline, config.autoscaling.min_replicas, config.settle_timeout_s)
        timeline.stop()
        if timeline.errors:
            print(f"{len(timeline.errors)} samples failed, the first: {timeline.errors[0]}", file=sys.stderr)
        return timeline.samples, results, timeline.replica_node, t0, load_end
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def measure(config: BenchAutoscaleConfig) -> tuple[dict, list[dict], list[dict], float]:
    """The whole loop on a fake cluster started and stopped here: (summary, timeline, requests, load end)."""
    store = Store(config.store)
    model_path = model_dir(config.model, store)
    from transformers import AutoTokenizer

    sessions = build_sessions(config.workload, word_list(AutoTokenizer.from_pretrained(model_path)))
    auth.send_token()  # the cluster has token authentication on
    with tempfile.TemporaryDirectory(prefix="rayfoundry-autoscale-") as folder:
        cluster = FakeCluster(fake_cluster_yaml(config, Path(folder)), dashboard_port=free_port())
        print(cluster.start(), file=sys.stderr)
        try:
            samples, results, replica_node, t0, load_end = run_loop(config, model_path, sessions, cluster)
        finally:
            print(cluster.stop(), file=sys.stderr)
    timeline = timeline_rows(samples, results, t0)
    requests = request_rows(results, replica_node, t0)
    return summarize(timeline, requests, load_end - t0, config.autoscaling.min_replicas), timeline, requests, \
        load_end - t0


@reports_user_errors("bench_autoscale")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_autoscale", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML with BenchAutoscaleConfig fields (default: the defaults)")
    args = parser.parse_args(argv)
    config = load_config(BenchAutoscaleConfig, args.config) if args.config else BenchAutoscaleConfig()
    summary, timeline, requests, load_end = measure(config)
    title = (f"{config.model}, tp={config.tensor_parallel_size}: {config.load_s:.0f} s of requests at "
             f"concurrency {config.concurrency}, replicas {config.autoscaling.min_replicas}-"
             f"{config.autoscaling.max_replicas} on a fake autoscaling cluster")
    report = "\n\n".join([title, markdown_table([summary], SUMMARY_COLUMNS)])
    print(report)
    uri = store_autoscale_results(summary, timeline, requests, load_end, report, title, Store(config.store))
    print(f"\nresults: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
