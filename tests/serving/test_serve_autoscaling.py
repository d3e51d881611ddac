"""Autoscaling on a real local Ray: replicas go up under load and back down after it."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from serving.conftest import deployed


@pytest.fixture
def autoscaled(serve_cluster, tiny_llama_dir):
    from serve_apps.app import build_app

    # The shared Ray's handles report their queue lengths every 0.5 s instead of 10: the test takes seconds.
    app = build_app({"models": [{
        "model_id": "tiny", "model": str(tiny_llama_dir), "num_cpus_per_replica": 0.5,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                        "upscale_delay_s": 0, "downscale_delay_s": 2, "look_back_period_s": 2},
        "engine": {"num_blocks": 64, "max_num_batched_tokens": 64}}]})
    with deployed(app, "llm"):
        yield serve_cluster.url


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["llm"].deployments["LLMServer:tiny"]
    return deployment.replica_states.get("RUNNING", 0)


def _wait_for(condition, timeout_s: float, timeline: list) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        timeline.append(_running_replicas())
        if condition(timeline[-1]):
            return True
        time.sleep(0.5)
    return False


def test_replicas_go_up_under_load_and_back_down(autoscaled):
    stop = threading.Event()
    body = json.dumps({"model": "tiny", "prompt": "Tell me a story", "max_tokens": 40, "ignore_eos": True}).encode()
    codes: list[int] = []

    def client():
        while not stop.is_set():
            request = urllib.request.Request(f"{autoscaled}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                codes.append(response.status)

    timeline = [_running_replicas()]
    assert timeline[0] == 1
    clients = [threading.Thread(target=client) for _ in range(6)]
    for thread in clients:
        thread.start()
    try:
        scaled_up = _wait_for(lambda n: n >= 2, 90, timeline)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert scaled_up, f"replicas under load: {timeline}"
    assert _wait_for(lambda n: n == 1, 90, timeline), f"replicas after the load: {timeline}"
    assert codes and set(codes) == {200}
    print("running replicas, every 0.5 s:", timeline)
