"""An asyncio face over LLMEngine, for Serve replicas: many concurrent streams, one engine loop.

The engine is not thread-safe and its step is blocking CPU/GPU work. So one background task
owns it: between steps it applies queued additions and aborts, then runs `step()` in a worker
thread (keeping the event loop free to accept requests) and hands each output to its stream.

If the loop ever fails (a bug, not bad input: prompts are checked before they are queued), the
engine's state can no longer be trusted. Every open stream and every later request then raises
EngineDeadError at once, instead of waiting for outputs that will never come, and the replica
reports itself unhealthy so Serve replaces it.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from serve_apps.engine.errors import EngineDeadError
from serve_apps.engine.llm_engine import LLMEngine, RequestOutput
from serve_apps.engine.request import Request
from serve_apps.engine.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue[RequestOutput | EngineDeadError]] = {}
        self._to_add: list[Request] = []
        self._to_abort: list[str] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._dead: EngineDeadError | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; cancelling the consumer aborts the request."""
        self._raise_if_dead()
        request = self.engine.new_request(prompt, params, request_id)  # bad input fails here, before queueing
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        stream = self._streams[request.request_id] = asyncio.Queue()
        self._to_add.append(request)
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                output = await stream.get()
                if isinstance(output, EngineDeadError):
                    raise output
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._to_abort.append(request_id)
        self._wake.set()

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise self._dead

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def _apply_queued(self) -> None:
        adds, self._to_add = self._to_add, []
        for request in adds:
            self.engine.add(request)
        aborts, self._to_abort = self._to_abort, []
        for request_id in aborts:
            self.engine.abort(request_id)

    async def _run(self) -> None:
        try:
            await self._serve_forever()
        except Exception as error:  # noqa: BLE001 - any failure ends the engine; streams must hear of it
            self._die(error)

    async def _serve_forever(self) -> None:
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

    def _die(self, error: Exception) -> None:
        self._dead = EngineDeadError(f"the engine stopped on an internal error: {error!r}")
        self._dead.__cause__ = error
        for stream in self._streams.values():
            stream.put_nowait(self._dead)

    def check_health(self) -> None:
        """Raise if the engine loop or one of its tensor-parallel workers died."""
        self._raise_if_dead()
        self.engine.check_health()

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=True)
        self.engine.shutdown()
