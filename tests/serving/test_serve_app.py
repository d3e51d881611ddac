"""The OpenAI-compatible Serve application on a real local Ray + Serve, with the official
`openai` client, over the tiny random Llama (SmolLM2's tokenizer and chat template)."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from email.message import Message

import pytest

from conftest import REPO
from serving.conftest import deployed

openai = pytest.importorskip("openai", reason="the openai client is in the test extras")
API_KEY = "test-key"


@pytest.fixture(scope="module")
def metrics_port(serve_cluster) -> int:
    return serve_cluster.metrics_port


@pytest.fixture(scope="module")
def served(serve_cluster, tiny_llama_dir, tiny_llama_long_dir):
    """build_app deployed on the shared local Ray (the ingress and five replicas at 0.5 CPU each);
    yields the base URL."""
    from serve_apps.app import build_app

    tiny = {"model": str(tiny_llama_dir), "num_cpus_per_replica": 0.5,
            "engine": {"num_blocks": 64, "max_num_batched_tokens": 64}}
    models = [{**tiny, "model_id": "tiny", "num_replicas": 2, "router": "kv_aware"},
              {**tiny, "model_id": "tight", "max_ongoing_requests": 1, "max_queued_requests": 1},
              {"model_id": "long", "model": str(tiny_llama_long_dir), "num_cpus_per_replica": 0.5,
               "engine": {"num_blocks": 256, "max_num_batched_tokens": 256}},
              {**tiny, "model_id": "ray-prefix", "router": "ray_prefix"}]
    with deployed(build_app({"models": models, "api_keys": [API_KEY]}), "llm"):
        yield serve_cluster.url


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0)


def _post(url: str, body: dict, key: str | None = API_KEY, headers_out: list | None = None) -> tuple[int, dict]:
    """(status, JSON body); the response headers (lower-cased names) go to headers_out when given."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        response = error
    with response:
        if headers_out is not None:
            headers_out.append({name.lower(): value for name, value in response.headers.items()})
        return response.status, json.loads(response.read())


def test_kv_aware_router_keeps_each_prefix_on_one_replica(served):
    """Two replicas; requests sharing a 2-block prefix follow the first one that cached it."""
    prefixes = {"a": list(range(1000, 1032)), "b": list(range(2000, 2032))}
    headers = {"a": [], "b": []}
    cached = {"a": [], "b": []}
    for i in range(5):
        for name, prefix in prefixes.items():
            code, reply = _post(f"{served}/v1/completions", {"model": "tiny", "prompt": prefix + [3000 + i],
                                                              "max_tokens": 2, "temperature": 0},
                                headers_out=headers[name])
            assert code == 200
            cached[name].append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
    served_by = {name: {h["x-rayfoundry-replica"] for h in hs} for name, hs in headers.items()}
    assert all(len(replicas) == 1 for replicas in served_by.values()), served_by
    assert all(tokens[1:] == [32] * 4 for tokens in cached.values()), cached  # both blocks, after the first


def test_overload_gets_429_and_loses_no_accepted_request(served):
    """One replica taking one request and queueing one: a burst of 12 gets 429s with Retry-After,
    every accepted request completes in full, and afterwards every KV block is free."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    body = {"model": "tight", "prompt": "Tell me a story", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    headers: list[dict] = []
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: _post(f"{served}/v1/completions", body, headers_out=headers), range(12)))
    codes = [code for code, _ in results]
    assert sum("retry-after" in h for h in headers) == codes.count(429)
    # How many get in depends on how fast the first ones start; some must be turned away.
    assert codes.count(429) >= 1 and codes.count(200) >= 1, codes
    assert set(codes) <= {200, 429}
    for code, reply in results:
        if code == 200:
            assert reply["usage"]["completion_tokens"] == 40
        else:
            assert reply["error"]["code"] == 429 and "backpressure" in reply["error"]["message"]
    assert _post(f"{served}/v1/completions", body)[0] == 200  # healthy afterwards
    stats = serve.get_deployment_handle("LLMServer:tight", app_name="llm").record_routing_stats.remote().result()
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == 64


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list()] == ["tiny", "tight", "long", "ray-prefix"]
    with urllib.request.urlopen(f"{served}/health", timeout=10) as response:
        assert response.status == 200


def test_completion_whole_and_streamed_agree(client):
    whole = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_without_max_tokens_a_completion_runs_to_the_end_of_the_context(client):
    out = client.completions.create(model="tiny", prompt="Hello there", temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 64  # the tiny model's context


def test_chat_whole_and_streamed_agree_and_n_choices(client):
    messages = [{"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    seeded = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=3, seed=7,
                                            extra_body={"ignore_eos": True})
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=3, seed=7,
                                           extra_body={"ignore_eos": True})
    assert sorted(c.index for c in seeded.choices) == [0, 1, 2]
    assert seeded.usage.prompt_tokens == whole.usage.prompt_tokens  # the prompt counts once, for all n
    assert seeded.usage.completion_tokens == 18
    assert [c.message.content for c in seeded.choices] == [c.message.content for c in again.choices]


def test_logprobs_and_echo(client):
    out = client.completions.create(model="tiny", prompt="One two three", max_tokens=3, temperature=0,
                                    logprobs=2, echo=True, extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    assert out.choices[0].text.startswith("One two three")
    assert logprobs.token_logprobs[0] is None  # the first prompt token: nothing predicts it
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) > 3
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 2 and all(len(e.top_logprobs) == 3 for e in entries)


def _send_raw(base: str, request_line: str, data: bytes, key: str | None = API_KEY) -> tuple[int, dict, Message]:
    """(status, JSON body, headers) of "METHOD /path" with `data` as its body. A server may answer a
    body it refuses before it has all of it and close the connection; the answer is read even when
    sending the rest fails."""
    import http.client

    method, path = request_line.split()
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        connection.request(method, path, data, headers)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    return response.status, json.loads(response.read()), response.headers


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


COMPLETIONS, CHAT = "POST /v1/completions", "POST /v1/chat/completions"
# Every bad request a user can send, one row each: (request line, body, API key, status, param named).
BAD_REQUESTS = {
    "malformed JSON": (COMPLETIONS, b'{"model": "tiny", "prompt": ', API_KEY, 400, None),
    "body not UTF-8": (COMPLETIONS, b'{"model": "tiny", "prompt": "\xff\xfe"}', API_KEY, 400, None),
    "JSON nested too deeply": (COMPLETIONS, b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                               API_KEY, 400, None),
    "body not an object": (COMPLETIONS, b'["tiny", "x"]', API_KEY, 400, None),
    "no body": (COMPLETIONS, b"", API_KEY, 400, None),
    "wrong type (max_tokens)": (COMPLETIONS, _json({"model": "tiny", "prompt": "x", "max_tokens": "many"}),
                                API_KEY, 400, "max_tokens"),
    "wrong type (messages)": (CHAT, _json({"model": "tiny", "messages": "hi"}), API_KEY, 400, "messages"),
    "unknown model": (COMPLETIONS, _json({"model": "nope", "prompt": "x"}), API_KEY, 404, "model"),
    "unknown path": ("POST /v1/nope", _json({"model": "tiny", "prompt": "x"}), API_KEY, 404, None),
    "wrong method": ("GET /v1/completions", b"", API_KEY, 405, None),
    "negative max_tokens": (COMPLETIONS, _json({"model": "tiny", "prompt": "x", "max_tokens": -5}), API_KEY, 400,
                            "max_tokens"),
    "prompt over the context": (COMPLETIONS, _json({"model": "tiny", "prompt": "word " * 200}), API_KEY, 400,
                                None),  # the tiny model's context is 64 tokens
    "token id past the vocabulary": (COMPLETIONS, _json({"model": "tiny", "prompt": [1, 2, 10_000_000]}), API_KEY,
                                     400, "prompt"),
    "negative token id": (COMPLETIONS, _json({"model": "tiny", "prompt": [5, -1]}), API_KEY, 400, "prompt"),
    "n = 0": (COMPLETIONS, _json({"model": "tiny", "prompt": "x", "n": 0}), API_KEY, 400, "n"),
    "10 MB body": (COMPLETIONS, _json({"model": "tiny", "prompt": "a" * 10_000_000}), API_KEY, 413, None),
    "bad API key": (COMPLETIONS, _json({"model": "tiny", "prompt": "x"}), "wrong-key", 401, None),
    "no API key": (CHAT, _json({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}), None, 401, None),
    "negative temperature": (COMPLETIONS, _json({"model": "tiny", "prompt": "x", "temperature": -1}), API_KEY,
                             400, "temperature"),
    "unknown field": (COMPLETIONS, _json({"model": "tiny", "prompt": "x", "frobnicate": 1}), API_KEY, 400,
                      "frobnicate"),
    "top_k 0": (COMPLETIONS, _json({"model": "tiny", "prompt": "x", "top_k": 0}), API_KEY, 400, None),
    "no messages": (CHAT, _json({"model": "tiny", "messages": []}), API_KEY, 400, "messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(served, case):
    request_line, data, key, status, param = BAD_REQUESTS[case]
    code, reply, _ = _send_raw(served, request_line, data, key)
    assert code == status, reply
    assert reply["error"]["code"] == status and reply["error"]["message"] and reply["error"]["type"]
    if param:
        assert reply["error"]["param"] == param


def test_a_bad_request_does_not_disturb_the_others(served):
    """Token ids past the vocabulary are refused in the ingress: the replica's engine never sees them,
    and requests in flight alongside (and after) complete."""
    from concurrent.futures import ThreadPoolExecutor

    good = {"model": "tiny", "prompt": "Tell me a story", "max_tokens": 20, "ignore_eos": True}
    bad = {"model": "tiny", "prompt": [1, 2, 10_000_000], "max_tokens": 20}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda body: _post(f"{served}/v1/completions", body), [good, bad, good, bad, good]))
    assert [code for code, _ in results] == [200, 400, 200, 400, 200]
    assert _post(f"{served}/v1/completions", good)[0] == 200


def test_a_wrong_method_names_the_allowed_one(served):
    code, reply, headers = _send_raw(served, "GET /v1/chat/completions", b"")
    assert code == 405 and headers["Allow"] == "POST" and "POST" in reply["error"]["message"]


def test_a_refused_body_gets_its_413_while_the_client_still_sends(served):
    """urllib asks the server to close the connection after its answer (`Connection: close`). A 413
    sent before the body was read, then that close, reset most of eight concurrent 10 MB uploads:
    closing a connection with unread bytes resets it, and the client lost the answer."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "tiny", "prompt": "a" * 10_000_000}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _post(f"{served}/v1/completions", body), range(16)))
    assert all(code == 413 and reply["error"]["code"] == 413 for code, reply in results)


def test_a_large_body_without_a_length_is_cut_off_as_it_arrives(served):
    """Sent in chunks (no Content-Length), the body is counted as it streams in and refused at the limit."""
    import http.client

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"a" * 100_000
        yield b'"}'

    host, port = served.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/completions", chunks(), {"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {API_KEY}"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == 413


@pytest.mark.parametrize("args, message", [
    ({"models": [{"model_id": "a", "model": "m", "num_replicaz": 2}]}, "unknown key 'models.0.num_replicaz'"),
    ({"models": [{"model_id": "a", "model": "m"}, {"model_id": "a", "model": "n"}]}, "model_id values must be unique"),
    ({"models": [{"model_id": "a", "model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]},
     "exceeds max_replicas"),
])
def test_rayfoundry_serve_rejects_a_bad_config_in_one_line(tmp_path, capsys, args, message):
    import yaml

    from serve_apps.serve_run import main

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "llm", "import_path": "serve_apps.app:build_app",
                                                        "args": args}]}))
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_the_shipped_serve_config_is_valid():
    from serve_apps.serve_run import check

    assert check(REPO / "configs" / "serve" / "smollm2.yaml") == 1


def _metric_lines(metrics_port: int, model: str) -> list[str]:
    """The Prometheus lines of Ray's metrics endpoint tagged with `model`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        return [line for line in response.read().decode().splitlines() if f'model="{model}"' in line]


def test_engine_and_router_metrics_reach_rays_metrics_endpoint(served, metrics_port):
    """Per-replica engine metrics and the kv_aware router's decisions, on Ray's Prometheus endpoint."""
    for i in range(3):
        assert _post(f"{served}/v1/completions", {"model": "tiny", "prompt": list(range(500, 540)) + [i],
                                                  "max_tokens": 3})[0] == 200
    wanted = ["ray_rayfoundry_engine_generation_tokens_total", "ray_rayfoundry_engine_prefix_cache_hit_rate",
              "ray_rayfoundry_engine_time_to_first_token_seconds_bucket", "ray_rayfoundry_router_decisions_total",
              "ray_rayfoundry_router_prompt_tokens_total"]
    deadline, lines = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        lines = _metric_lines(metrics_port, "tiny")
        if all(any(line.startswith(name) for line in lines) for name in wanted):
            break
        time.sleep(1)
    missing = [name for name in wanted if not any(line.startswith(name) for line in lines)]
    assert not missing, missing
    hit_rates = [float(line.rsplit(" ", 1)[1]) for line in lines
                 if line.startswith("ray_rayfoundry_engine_prefix_cache_hit_rate")]
    assert all(0 <= rate <= 1 for rate in hit_rates) and max(hit_rates) > 0  # the repeats hit
    assert any('reason="prefix"' in line for line in lines if line.startswith("ray_rayfoundry_router_decisions"))
    assert all('replica="' in line for line in lines if line.startswith("ray_rayfoundry_engine_generation"))


def _scrape(metrics_port: int, name: str, model: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in _metric_lines(metrics_port, model) if line.startswith(name))


def test_a_client_that_disconnects_aborts_its_request_and_frees_its_blocks(served, metrics_port):
    """A stream of 3,000 tokens, dropped after its first chunk: the engine aborts it."""
    import http.client

    from ray import serve

    handle = serve.get_deployment_handle("LLMServer:long", app_name="llm")
    body = {"model": "long", "prompt": "Once", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    connection = http.client.HTTPConnection(served.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert handle.record_routing_stats.remote().result()["num_requests"] == 1
    connection.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    connection.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            _scrape(metrics_port, "ray_rayfoundry_engine_aborted_requests_total", "long") < 1
            or handle.record_routing_stats.remote().result()["num_requests"]):
        time.sleep(0.5)
    stats = handle.record_routing_stats.remote().result()
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == 256
    generated = _scrape(metrics_port, "ray_rayfoundry_engine_generation_tokens_total", "long")
    assert _scrape(metrics_port, "ray_rayfoundry_engine_aborted_requests_total", "long") == 1, f"{generated} tokens"
    assert generated < 3000


def test_ray_prefix_router_serves_token_ids_chat_and_several_choices(client):
    """Ray's router finds no text in a prompt of token ids (it would divide by zero and leave the
    request pending forever) and, without FIFO, could strand one of n choices; ours guards both."""
    tokens = client.completions.create(model="ray-prefix", prompt=[1000, 1001, 1002], max_tokens=3, timeout=30)
    assert tokens.usage.completion_tokens == 3
    chat = client.chat.completions.create(model="ray-prefix", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, n=3, seed=1, timeout=30)
    assert len(chat.choices) == 3

