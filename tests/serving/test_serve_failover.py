"""A replica's process killed mid-run, on a real local Ray + Serve: Serve replaces it, the router
stops sending to it, and requests that had not started on it succeed on the other replica."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.conftest import deployed

pytestmark = pytest.mark.slow
APP = "failover"


@pytest.fixture(scope="module")
def served(serve_cluster, tiny_llama_long_dir):
    from serve_apps.app import build_app

    model = {"model_id": "tiny", "model": str(tiny_llama_long_dir), "num_replicas": 2, "num_cpus_per_replica": 1,
             "router": "kv_aware", "routing_stats_period_s": 0.5,
             "engine": {"num_blocks": 512, "max_num_batched_tokens": 256}}
    with deployed(build_app({"models": [model], "ingress_num_cpus": 0}), APP):
        yield serve_cluster.url


def _replica_pids() -> list[int]:
    """The replicas' processes (Ray titles each `ray::ServeReplica:<app>:<deployment>`)."""
    import psutil

    title = f"ray::ServeReplica:{APP}:LLMServer:tiny"
    processes = psutil.process_iter(["cmdline"])
    return sorted(p.pid for p in processes if " ".join(p.info["cmdline"] or []).startswith(title))


def _complete(base: str, prompt: str, max_tokens: int = 4) -> tuple[int, str]:
    """(status, replica that answered) of one completion."""
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            json.loads(response.read())
            return response.status, response.headers["X-Rayfoundry-Replica"]
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (urllib.error.URLError, ConnectionError):  # a stream cut by the dying replica
        return 0, ""


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["LLMServer:tiny"]
    return status.replica_states.get("RUNNING", 0)


def test_a_killed_replica_is_replaced_and_requests_go_elsewhere(served):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    before = {_complete(served, f"{w} " * 40)[1] for w in words}  # distinct prefixes spread over both
    assert len(before) == 2, before
    pids = _replica_pids()
    assert len(pids) == 2, pids
    with ThreadPoolExecutor(12) as pool:
        # long generations in flight on both replicas when one dies; those on it may fail
        in_flight = [pool.submit(_complete, served, f"{w} {w} story " * 30, 2000) for w in words[:4]]
        time.sleep(2.0)
        os.kill(pids[0], signal.SIGKILL)
        after = [_complete(served, f"{w} after " * 30) for w in words]  # sent after the kill, one by one
        for future in in_flight:
            future.result()
    assert all(status == 200 for status, _ in after), after
    survivors = {replica for _, replica in after} & before
    assert len(survivors) == 1, (before, after)  # the dead replica answered nothing after the kill
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (_running_replicas() == 2 and len(_replica_pids()) == 2):
        time.sleep(1)
    assert _running_replicas() == 2 and pids[0] not in _replica_pids()  # replaced by a new process
    later = [_complete(served, f"{w} later " * 40) for w in words]
    assert all(status == 200 for status, _ in later)
    assert {replica for _, replica in later} - before  # the replacement takes requests (new prefixes fill it)
