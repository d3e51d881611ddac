"""Tensor-parallel replicas on a multi-node Ray (ray.cluster_utils.Cluster: one machine, several
raylets with declared CPUs and logical GPUs): where the ranks land under each strategy, exact tokens
across nodes behind the kv_aware router, and a worker killed mid-run."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from conftest import free_port, ray_auth_mode

openai = pytest.importorskip("openai", reason="the openai client is in the test extras")
pytestmark = pytest.mark.slow
MODEL = "tiny"
PROMPTS = ["The quick brown fox", "To be or not to be, that is", "Once upon a time"]


@pytest.fixture(scope="module")
def cluster():
    """A head with 2 CPUs (room for a STRICT_PACK tp=2 replica) and four 1-CPU nodes with a logical GPU."""
    with ray_auth_mode("disabled"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        for _ in range(4):
            cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


def _app(model_dir, **changes):
    from serve_apps.app import build_app

    engine = {"tensor_parallel_size": 2, "num_blocks": 256, "block_size": 16, **changes.pop("engine", {})}
    return build_app({"ingress_num_cpus": 0, "models": [{"model_id": MODEL, "model": str(model_dir),
                                                         "num_cpus_per_replica": 1, "engine": engine, **changes}]})


def _one_rank_texts(model_dir) -> list[str]:
    from serve_apps.engine.config import EngineConfig
    from serve_apps.engine.llm_engine import LLMEngine
    from serve_apps.engine.sampling_params import SamplingParams

    engine = LLMEngine(model_dir, EngineConfig(num_blocks=64))
    return [o.text for o in engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]


def _texts(port) -> list[str]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    return [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


def _replicas(count: int) -> list[dict]:
    """Every replica's state (its ranks, its KV blocks), by asking until `count` different ones answered."""
    handle = serve.get_deployment_handle(f"LLMServer:{MODEL}", "tp")
    seen = {}
    for _ in range(200):  # the router picks the replica: ask until each has answered
        state = handle.replica_state.remote().result()
        seen[state["ranks"][0]["pid"]] = state
        if len(seen) == count:
            return list(seen.values())
    raise AssertionError(f"{len(seen)} of {count} replicas answered")


def _ranks(count: int = 1) -> list[list[dict]]:
    return [state["ranks"] for state in _replicas(count)]


def test_strict_pack_keeps_a_replica_on_one_node(cluster, tiny_llama_long_dir):
    serve.run(_app(tiny_llama_long_dir), name="tp", route_prefix="/")
    try:
        (ranks,) = _ranks()
        assert len({rank["node_id"] for rank in ranks}) == 1
        assert _texts(cluster) == _one_rank_texts(tiny_llama_long_dir)
    finally:
        serve.delete("tp")


def test_spread_replicas_span_nodes_behind_kv_aware_and_serve_exactly(cluster, tiny_llama_long_dir):
    """Two tp=2 replicas, SPREAD: each replica's ranks on two nodes (1 CPU, 1 logical GPU a bundle),
    gloo across them; the same tokens as one rank, through the kv_aware router."""
    app = _app(tiny_llama_long_dir, num_replicas=2, router="kv_aware",
               engine={"placement_strategy": "SPREAD", "num_gpus_per_worker": 1})
    serve.run(app, name="tp", route_prefix="/")
    try:
        for ranks in _ranks(2):
            assert len({rank["node_id"] for rank in ranks}) == 2
        expected = _one_rank_texts(tiny_llama_long_dir)
        for _ in range(2):
            assert _texts(cluster) == expected
    finally:
        serve.delete("tp")


def test_a_killed_worker_fails_its_requests_fast_and_serve_replaces_the_replica(cluster, tiny_llama_long_dir):
    """Two replicas (pow2 spreads the long requests over both); one replica's worker is SIGKILLed while
    both decode: that replica's requests end in seconds with 503 (a stream with an error event), the
    other replica's finish and leave every KV block free; Serve replaces the dead replica."""
    serve.run(_app(tiny_llama_long_dir, num_replicas=2, router="pow2", engine={"placement_strategy": "PACK"}),
              name="tp", route_prefix="/")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster}/v1", api_key="unused", max_retries=0)
        outcomes = []

        def long_request(stream: bool):
            outcome = {}
            try:
                response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3000, temperature=0,
                                                     stream=stream, extra_body={"ignore_eos": True})
                outcome["tokens"] = sum(1 for _ in response) if stream else response.usage.completion_tokens
            except openai.APIStatusError as error:
                outcome["status"] = error.status_code
            except openai.APIError as error:  # an error event inside a stream that had begun
                outcome["error"] = error
            outcome["ended"] = time.monotonic()
            outcomes.append(outcome)

        threads = [threading.Thread(target=long_request, args=(i % 2 == 0,)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        victim, survivor = _replicas(2)
        killed_at = time.monotonic()
        os.kill(victim["ranks"][1]["pid"], signal.SIGKILL)
        for thread in threads:
            thread.join(120)
        failed = [o for o in outcomes if "tokens" not in o]
        assert failed and all(o.get("status", 503) == 503 for o in failed), outcomes
        assert all(o["ended"] - killed_at < 15 for o in failed), [o["ended"] - killed_at for o in failed]
        print(f"worker killed: {len(failed)} of {len(outcomes)} requests failed, the last "
              f"{max(o['ended'] for o in failed) - killed_at:.2f} s after; statuses {[o.get('status') for o in failed]}")
        assert any("tokens" in o for o in outcomes), outcomes  # the other replica's requests finished
        deadline = time.monotonic() + 180
        while True:  # Serve's health check finds the replica dead and starts another, with new workers
            try:
                assert _texts(cluster) == _one_rank_texts(tiny_llama_long_dir)
                break
            except openai.APIError:
                assert time.monotonic() < deadline, "the replica was not replaced"
                time.sleep(2)
        states = _replicas(2)
        assert survivor["ranks"][0]["pid"] in {state["ranks"][0]["pid"] for state in states}
        assert all(state["num_free_blocks"] == state["num_blocks"] for state in states)  # no block leaked
    finally:
        serve.delete("tp")


def test_a_replica_the_nodes_cannot_hold_is_refused_naming_what_is_missing(cluster, tiny_llama_long_dir):
    with pytest.raises(ValueError, match="STRICT_PACK needs CPU 4 on one node; no node has it"):
        _app(tiny_llama_long_dir, engine={"tensor_parallel_size": 4})
