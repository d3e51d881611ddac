"""The autoscaling loop end to end on one machine. A fake multi-node cluster (cluster/fake-multinode.yaml):
Ray's real autoscaler with its FakeMultiNodeProvider, which starts each worker "node" as a local raylet
offering the node type's CPUs and logical GPUs. No cloud can be reached here; the launcher YAMLs for
one are checked against Ray's schema in test_cluster_configs.py."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
import ray

from cluster import auth
from cluster.config import parse_config
from cluster.fake_cluster import FakeCluster
from conftest import RAYFOUNDRY, run
from jobs.bench.cluster_timeline import HEAD_RESOURCE, worker_nodes
from jobs.bench_autoscale import BenchAutoscaleConfig, fake_cluster_yaml, measure
from jobs.search.config import SearchConfig
from jobs.search.run import run_search
from kernels.cpu_ops import native_ops

pytestmark = pytest.mark.slow
IDLE_TIMEOUT_S = 15


@pytest.fixture(autouse=True)
def api_keys_here(tmp_path, monkeypatch):
    """The Serve API keys a fake cluster hands its ingress, kept out of the user's ~/.rayfoundry."""
    monkeypatch.setenv("RAYFOUNDRY_API_KEYS_FILE", str(tmp_path / "api_keys"))


def test_load_launches_nodes_whose_replicas_serve_then_replicas_and_nodes_go(tiny_llama_long_dir, tmp_path):
    """From 0 worker nodes: replicas that each want a GPU (the head has none) make the autoscaler
    launch nodes, the replicas there serve requests (each response names its replica, each replica
    its node); after the load the deployment returns to 0 replicas and the nodes go within the idle
    timeout; no request fails."""
    native_ops()  # built here if this machine has not yet: a replica waiting on the build outlasts the load
    config = parse_config(BenchAutoscaleConfig, {
        "model": str(tiny_llama_long_dir), "idle_timeout_minutes": IDLE_TIMEOUT_S / 60, "load_s": 75,
        "concurrency": 8, "max_tokens": 24, "engine": {"kv_cache_memory_gib": 0.05, "max_num_seqs": 16},
        "store": str(tmp_path / "store")})
    summary, timeline, requests, load_end = measure(config)
    assert summary["server_errors"] == 0, [r["error"] for r in requests if not r["ok"]][:3]
    assert summary["ok"] == summary["requests"] > 0
    assert timeline[0]["worker_nodes"] == 0
    assert summary["max_worker_nodes"] >= 2 and summary["worker_nodes_serving"] >= 2, summary
    assert all(r["node"] for r in requests if r["ok"]), "a response's replica was not found on any node"
    assert summary["final_replicas"] == 0 and summary["final_worker_nodes"] == 0, summary
    assert summary["nodes_gone_s"] <= IDLE_TIMEOUT_S + 15, summary  # the autoscaler checks every second


@pytest.fixture
def fake_cluster(tmp_path):
    """`rayfoundry up --cluster` on a copy of cluster/fake-multinode.yaml (a free GCS port), and `down`."""
    path = fake_cluster_yaml(BenchAutoscaleConfig(idle_timeout_minutes=IDLE_TIMEOUT_S / 60), tmp_path)
    up = run([*RAYFOUNDRY, "up", "--cluster", str(path)], dict(os.environ), timeout=300)
    assert up.returncode == 0 and "fake autoscaling cluster started" in up.stdout, up.stderr
    cluster = FakeCluster(path)
    try:
        yield cluster
    finally:
        down = run([*RAYFOUNDRY, "down", "--cluster", str(path)], dict(os.environ), timeout=120)
    assert down.returncode == 0 and "fake cluster stopped" in down.stdout, down.stderr
    assert not cluster.running(), "a process of the fake cluster outlived `rayfoundry down --cluster`"


def test_the_fake_cluster_refuses_a_request_without_its_token(fake_cluster):
    request = urllib.request.Request(f"{fake_cluster.dashboard_url}/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    request.add_header(*next(iter(auth.headers().items())))
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read()) == []


def test_a_search_whose_trials_want_gpus_starts_nodes_for_them(fake_cluster, tiny_llama_dir, smollm2_home, tmp_path):
    """Each trial wants a GPU, which only worker nodes have: the autoscaler launches them, every trial
    runs on one, and the nodes go once the search is done."""
    data = str(smollm2_home / "store" / "datasets" / "shakespeare")
    config = parse_config(SearchConfig, {
        "name": "autoscaled", "model": str(tiny_llama_dir), "data": data, "store": str(tmp_path / "store"),
        "eval": {"tokens": 256, "window": 64, "batch_size": 2}, "budget": {"max_ppl_increase": 0.5},
        "objectives": ["ppl", "linear_bytes"], "space": {"bits": [4, 8, None], "group_size": [32, None],
                                                         "quant_method": ["rtn"], "head_bits": [8, None]},
        "seeds": {"recipes": ["configs/recipes/int8-weight.yaml"]}, "searcher": {"kind": "random"},
        "num_trials": 2, "concurrency": 2, "resources_per_trial": {"cpu": 1, "gpu": 1},
        "ray_address": fake_cluster.address})
    auth.send_token()
    assert run_search(config) == 0
    ray.init(address=fake_cluster.address, log_to_driver=False, ignore_reinit_error=True)
    try:
        (head,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]]
        deadline = time.monotonic() + IDLE_TIMEOUT_S + 30
        while worker_nodes() and time.monotonic() < deadline:
            time.sleep(1)
        assert not worker_nodes(), "the search's nodes outlived the idle timeout"
    finally:
        ray.shutdown()
    (folder,) = (tmp_path / "store" / "results").iterdir()
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows), rows
    assert head not in {r["node_id"] for r in rows}, "a trial ran on the head, which has no GPU"
    assert len({r["node_id"] for r in rows}) >= 2
