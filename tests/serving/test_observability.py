"""A real Prometheus scrapes a real Serve app (the tiny Llama, two replicas behind kv_aware) under load
from the serving benchmark's load generator, and every panel of the Serving and Cluster dashboards has
data through Prometheus's HTTP API: none names a metric we do not export. The load is shaped so that
each event a panel counts happens: shared system prompts (prefix hits), a KV cache too small for all
requests at once (preemptions), a queue that overflows (429), a client that leaves mid-stream (abort)."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time

import pytest

from cluster import prometheus
from cluster.dashboards import ray_cluster
from cluster.dashboard_render import render
from cluster.dashboards import serving
from conftest import free_port
from serving.conftest import deployed

MODEL = "observed"
LOAD_S = 25


@pytest.fixture(scope="module")
def scraper(serve_cluster, tmp_path_factory):
    """Our Prometheus, reading a discovery file in Ray's format that lists the node's metrics endpoint."""
    session = tmp_path_factory.mktemp("session")
    targets = [{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{serve_cluster.metrics_port}"]}]
    (session / prometheus.SERVICE_DISCOVERY_FILE).write_text(json.dumps(targets))
    instance = prometheus.Prometheus(session / "prometheus", port=free_port())
    prometheus.start(instance, session, interval_s=1)
    yield instance
    prometheus.stop(instance)


@pytest.fixture(scope="module")
def observed(serve_cluster, tiny_llama_long_dir):
    from serve_apps.app import build_app

    model = {"model_id": MODEL, "model": str(tiny_llama_long_dir), "num_replicas": 2, "num_cpus_per_replica": 0.5,
             "router": "kv_aware", "max_ongoing_requests": 4, "max_queued_requests": 2,
             # 20 blocks of 16 tokens hold ~3 of these ~100-token requests: the rest wait or are preempted
             "engine": {"num_blocks": 20, "block_size": 16, "max_num_batched_tokens": 128}}
    with deployed(build_app({"models": [model]}), "observed"):
        yield serve_cluster.url


def _load(url: str, tokenizer_dir) -> list:
    from transformers import AutoTokenizer

    from jobs.bench.serve_load import run_load
    from jobs.bench.serve_workloads import WorkloadConfig, build_sessions, word_list

    workload = WorkloadConfig(kind="multi_tenant", requests=400, tenants=2, system_prompt_words=64)
    sessions = build_sessions(workload, word_list(AutoTokenizer.from_pretrained(tokenizer_dir)))
    results, _ = asyncio.run(run_load(url, MODEL, sessions, max_tokens=24, concurrency=16, stop_after_s=LOAD_S))
    return results


def _leave_mid_stream(url: str) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 500, "ignore_eos": True, "stream": True}
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def test_every_serving_and_cluster_panel_has_data_in_prometheus(observed, scraper, tiny_llama_long_dir, tmp_path):
    started = time.time()
    results = _load(observed, tiny_llama_long_dir)
    _leave_mid_stream(observed)
    statuses = {r.status for r in results}
    assert 200 in statuses and 429 in statuses, statuses
    time.sleep(5)  # the last events reach Ray's endpoint (0.5 s here) and a scrape (1 s)
    sheets = render([serving(), ray_cluster()], scraper.url, since_s=time.time() - started, out=tmp_path)
    assert {sheet.path.name: sheet.without_data for sheet in sheets} == {
        "rayfoundry-serving.png": (), "rayfoundry-cluster.png": ()}
