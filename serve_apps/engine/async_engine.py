"""An asyncio face over LLMEngine, for Serve replicas: many concurrent streams, one engine loop.

The engine is not thread-safe and its step is blocking CPU/GPU work. So one background task
owns it: between steps it applies queued additions and aborts, then runs `step()` in a worker
thread (keeping the event loop free to accept requests) and hands each output to its stream.
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from serve_apps.engine.llm_engine import LLMEngine, RequestOutput
from serve_apps.engine.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._to_add: list[tuple[list[int], SamplingParams, str]] = []
        self._to_abort: list[str] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._ids = itertools.count()

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; cancelling the consumer aborts the request."""
        request_id = request_id or f"async-{next(self._ids)}"
        token_ids = self.engine.tokenize(prompt)
        self.engine.check_prompt(token_ids)  # bad input fails here, before anything is queued
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = self._streams[request_id] = asyncio.Queue()
        self._to_add.append((token_ids, params, request_id))
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._to_abort.append(request_id)
        self._wake.set()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def _apply_queued(self) -> None:
        adds, self._to_add = self._to_add, []
        for token_ids, params, request_id in adds:
            self.engine.add_request(token_ids, params, request_id)
        aborts, self._to_abort = self._to_abort, []
        for request_id in aborts:
            self.engine.abort(request_id)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_queued()
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                if not self._to_add and not self._to_abort:
                    await self._wake.wait()
                continue
            for output in await loop.run_in_executor(self._executor, self.engine.step):
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put_nowait(output)

    def check_health(self) -> None:
        """Raise if the engine loop died (an exception escaped a step)."""
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"engine loop died: {task.exception()!r}")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=True)
