"""A load generator for an OpenAI-compatible endpoint: sessions of streamed chat requests at a
fixed concurrency or arriving as a Poisson process; every request timed from the client's side.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp

from jobs.bench.serve_workloads import Messages, Session


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    replica: str = ""
    status: int = 0  # the HTTP status; 0 when no response came
    error: str = ""
    first_message: str = ""  # the shared part of multi-tenant and multi-turn prompts

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


async def _chat(http: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    result = RequestResult(ok=False, start=time.perf_counter(), end=0.0,
                           first_message=body["messages"][0]["content"])
    try:
        async with http.post(url, json=body) as response:
            result.replica = response.headers.get("X-Rayfoundry-Replica", "")
            result.status = response.status
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:
                _read_event(line.decode().strip(), result)
        result.ok = result.output_tokens > 0
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        result.error = repr(error)
    finally:
        result.end = time.perf_counter()
    return result


def _read_event(line: str, result: RequestResult) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    event = json.loads(line[len("data: "):])
    now = time.perf_counter()
    for choice in event.get("choices", []):
        if choice.get("delta", {}).get("content"):
            result.first_token = result.first_token or now
            result.token_times.append(now)
    if event.get("usage"):
        usage = event["usage"]
        result.prompt_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def _body(model: str, messages: Messages, max_tokens: int) -> dict:
    # ignore_eos: every request produces max_tokens, so policies are compared on equal work
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _run_session(http, url: str, model: str, session: Session, max_tokens: int) -> list[RequestResult]:
    return [await _chat(http, url, _body(model, messages, max_tokens)) for messages in session]


async def run_load(base_url: str, model: str, sessions: list[Session], max_tokens: int, *,
                   concurrency: int | None = None, request_rate: float | None = None, seed: int = 0,
                   api_key: str | None = None, timeout_s: float = 600,
                   stop_after_s: float | None = None) -> tuple[list[RequestResult], float]:
    """Sends every session; returns each request's result and the wall time of the whole load.
    `concurrency`: that many sessions in flight at all times. `request_rate`: sessions start as a
    Poisson process of that rate (per second), however many are in flight. `stop_after_s`: no session
    starts after that many seconds (those started finish)."""
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency and request_rate")
    url = f"{base_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        start = time.perf_counter()
        deadline = start + stop_after_s if stop_after_s is not None else float("inf")
        if concurrency is not None:
            batches = await _fixed_concurrency(http, url, model, sessions, max_tokens, concurrency, deadline)
        else:
            batches = await _poisson(http, url, model, sessions, max_tokens, request_rate, seed, deadline)
        wall = time.perf_counter() - start
    return [result for batch in batches for result in batch], wall


async def _fixed_concurrency(http, url, model, sessions, max_tokens, concurrency,
                             deadline: float) -> list[list[RequestResult]]:
    queue: asyncio.Queue = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)
    batches: list[list[RequestResult]] = []

    async def worker():
        while not queue.empty() and time.perf_counter() < deadline:
            batches.append(await _run_session(http, url, model, queue.get_nowait(), max_tokens))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(sessions)))))
    return batches


async def _poisson(http, url, model, sessions, max_tokens, rate, seed,
                   deadline: float) -> list[list[RequestResult]]:
    rng = random.Random(seed)
    tasks = []
    for session in sessions:
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(_run_session(http, url, model, session, max_tokens)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))
