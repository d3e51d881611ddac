"""The OpenAI-compatible HTTP front door: FastAPI routes that turn each request into token ids and
one SamplingParams per choice, fan it out to an LLMServer deployment (one stream per choice) and
assemble the replies, streamed as OpenAI sends them (SSE `data:` chunks, optional usage,
`data: [DONE]`) or whole. Every error it answers is OpenAI's error JSON.

(No `from __future__ import annotations` here: FastAPI reads the route signatures' types. And
Ingress comes last: serve.ingress freezes the app, with the globals its routes see, at once.)
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from serve_apps.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimit
from serve_apps.chunks import Chunk
from serve_apps.engine.sampling_params import SamplingParams
from serve_apps.openai_errors import OpenAIError, add_error_handlers, failure, overloaded
from serve_apps.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    usage,
)
from serve_apps.prompts import PromptBuilder

api = FastAPI(title="rayfoundry OpenAI-compatible API")
api.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES
api.add_middleware(BodyLimit, limit_of=lambda: api.state.max_body_bytes)
add_error_handlers(api)
logger = logging.getLogger("ray.serve")


def _cancel(streams) -> None:
    """Stop replica responses nobody will read (another choice failed, or the client went away)."""
    for stream in streams:
        with contextlib.suppress(Exception):  # one that never started: Serve's cancel re-raises why
            stream.cancel()


def _message(error: Exception) -> str:
    """The user's mistake in one line, not a replica's traceback."""
    cause = getattr(error, "cause", None) or error
    return " ".join(str(cause).split())


def _sampling_params(body) -> list[SamplingParams]:
    """One per choice, built once here: the replicas receive them as they are."""
    try:
        return [body.sampling_params(choice) for choice in range(body.n)]
    except ValueError as error:
        raise OpenAIError(400, _message(error)) from error


def _echoed(first: Chunk, prompt_text: str) -> Chunk:
    """With echo, the prompt's text (and its logprobs, when asked) lead a choice's first chunk."""
    return dataclasses.replace(first, text=prompt_text + first.text,
                               logprobs=(first.prompt_logprobs or []) + first.logprobs)


async def _merge(choices: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of all choices as they come, tagged with their choice index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(choices)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield item
        for task in tasks:
            task.result()  # surface a stream's error
    finally:
        for task in tasks:
            task.cancel()  # the reader went away; Choices.cancel_unfinished stops the replicas


def _replica_header(replica: str) -> dict:
    return {"X-Rayfoundry-Replica": replica} if replica else {}


async def _sse_lines(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
    except Exception as error:  # the 200 has gone out: the error goes in the stream, as OpenAI sends it
        logger.exception("a streamed request failed")
        yield f"data: {json.dumps(failure(error).body())}\n\n"
    yield "data: [DONE]\n\n"


class Choices(list):
    """The streams of a request's choices (each already past its first chunk), and the replica that
    answered the first. It knows which replica responses are still generating, so that a reply that
    ends early (the client went away) can stop them: Serve's own propagation of a cancelled HTTP
    request does not reach them every time, and Starlette never closes an abandoned stream's
    generators (the engine would go on generating until the garbage collector found them)."""

    def __init__(self, responses: list, firsts: list[Chunk]):
        self.responses = responses
        self.finished = [False] * len(responses)
        super().__init__(self._stream(i, first, rest) for i, (first, rest) in enumerate(zip(firsts, responses)))
        self.replica = firsts[0].replica

    async def _stream(self, index: int, first: Chunk, rest) -> AsyncIterator[Chunk]:
        yield first
        async for chunk in rest:
            yield chunk
        self.finished[index] = True

    def cancel_unfinished(self) -> None:
        _cancel(response for response, done in zip(self.responses, self.finished) if not done)


class _EventStream(StreamingResponse):
    """SSE whose end, however it comes (done, client gone, cancelled), stops what still generates."""

    def __init__(self, events: AsyncIterator[dict], choices: Choices):
        super().__init__(_sse_lines(events), media_type="text/event-stream", headers=_replica_header(choices.replica))
        self.choices = choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.choices.cancel_unfinished()


async def _whole(reply, choices: Choices) -> JSONResponse:
    """A whole reply's JSON; a request cancelled while it is gathered stops its replicas."""
    try:
        return JSONResponse(await reply, headers=_replica_header(choices.replica))
    finally:
        choices.cancel_unfinished()


class _Totals:
    def __init__(self, n: int):
        self.prompt = 0
        self.completion = [0] * n
        self.cached = 0

    def add(self, index: int, chunk: Chunk) -> None:
        self.prompt = chunk.num_prompt_tokens
        self.completion[index] = chunk.num_output_tokens
        if index == 0:
            self.cached = chunk.num_cached_tokens

    def usage(self) -> dict:
        # As OpenAI counts it: the prompt once for all n, and cached as the first choice found it.
        return usage(self.prompt, sum(self.completion), self.cached)


async def _stream_completion(meta: dict, choices, body: CompletionRequest) -> AsyncIterator[dict]:
    totals, offsets = _Totals(body.n), [0] * body.n
    async for index, chunk in _merge(choices):
        totals.add(index, chunk)
        logprobs = completion_logprobs(chunk.logprobs, offsets[index]) if body.logprobs is not None else None
        offsets[index] += len(chunk.text)
        yield {**meta, "choices": [{"index": index, "text": chunk.text, "logprobs": logprobs,
                                    "finish_reason": chunk.finish_reason}]}
    if body.include_usage:
        yield {**meta, "choices": [], "usage": totals.usage()}


async def _collect(choices, body) -> tuple[list[str], list[list], list[str | None], _Totals]:
    """Each choice's whole text, logprob entries and finish reason."""
    texts, entries = [""] * body.n, [[] for _ in range(body.n)]
    reasons, totals = [None] * body.n, _Totals(body.n)
    async for index, chunk in _merge(choices):
        totals.add(index, chunk)
        texts[index] += chunk.text
        entries[index] += chunk.logprobs
        reasons[index] = chunk.finish_reason or reasons[index]
    return texts, entries, reasons, totals


async def _whole_completion(meta: dict, choices, body: CompletionRequest) -> dict:
    texts, entries, reasons, totals = await _collect(choices, body)
    return {**meta, "choices": [
        {"index": i, "text": texts[i], "finish_reason": reasons[i],
         "logprobs": completion_logprobs(entries[i], 0) if body.logprobs is not None else None}
        for i in range(body.n)], "usage": totals.usage()}


async def _stream_chat(meta: dict, choices, body: ChatCompletionRequest) -> AsyncIterator[dict]:
    meta = {**meta, "object": "chat.completion.chunk"}
    for index in range(body.n):  # OpenAI opens each choice with the role alone
        yield {**meta, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
    totals = _Totals(body.n)
    async for index, chunk in _merge(choices):
        totals.add(index, chunk)
        delta = {"content": chunk.text} if chunk.text or not chunk.finish_reason else {}
        logprobs = chat_logprobs(chunk.logprobs) if body.logprobs else None
        yield {**meta, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                    "finish_reason": chunk.finish_reason}]}
    if body.include_usage:
        yield {**meta, "choices": [], "usage": totals.usage()}


async def _whole_chat(meta: dict, choices, body: ChatCompletionRequest) -> dict:
    texts, entries, reasons, totals = await _collect(choices, body)
    return {**meta, "object": "chat.completion", "choices": [
        {"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i],
         "logprobs": chat_logprobs(entries[i]) if body.logprobs else None} for i in range(body.n)],
        "usage": totals.usage()}


@serve.ingress(api)
class Ingress:
    """Routes by the request's `model` to that model's LLMServer handle."""

    def __init__(self, servers: dict, models: dict[str, str], api_keys: list[str] | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        """servers: model id -> LLMServer handle; models: model id -> the model to tokenize with."""
        api.state.max_body_bytes = max_body_bytes
        self.servers = servers
        self.prompts = {model_id: PromptBuilder(model) for model_id, model in models.items()}
        self.api_keys = set(api_keys or []) | {k for k in os.environ.get("RAYFOUNDRY_API_KEYS", "").split(",") if k}

    # -- plumbing ---------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header.removeprefix("Bearer ") not in self.api_keys:
            raise OpenAIError(401, "invalid or missing API key (Authorization: Bearer <key>)", "authentication_error")

    def _prompts(self, model: str) -> PromptBuilder:
        if model not in self.prompts:
            raise OpenAIError(404, f"model {model!r} is not served here; see GET /v1/models", "not_found_error",
                              "model")
        return self.prompts[model]

    def _token_ids(self, body) -> list[int]:
        """The prompt as the engine reads it; a mistake in it is a 400 naming the field."""
        prompts = self._prompts(body.model)
        is_chat = isinstance(body, ChatCompletionRequest)
        try:
            return prompts.chat(body.messages) if is_chat else prompts.completion(body.prompt)
        except ValueError as error:
            raise OpenAIError(400, _message(error), param="messages" if is_chat else "prompt") from error

    async def _choices(self, body, token_ids: list[int], echo: str | None = None) -> Choices:
        """One stream per choice, each already started, so bad input and overload fail here.
        `echo`: text to lead each choice with (the prompt, for a completion that echoes it)."""
        params = _sampling_params(body)
        server = self.servers[body.model].options(stream=True)
        client_prompt = body.messages if isinstance(body, ChatCompletionRequest) else body.prompt
        streams = []
        try:
            for choice_params in params:  # by keyword: request routers read the arguments by name
                streams.append(server.generate.remote(token_ids=token_ids, params=choice_params,
                                                      client_prompt=client_prompt))
            firsts = [await stream.__anext__() for stream in streams]
        except ValueError as error:  # a prompt the engine refuses: too long for the context or the cache
            _cancel(streams)
            raise OpenAIError(400, _message(error)) from error
        except BackPressureError as error:
            _cancel(streams)
            raise overloaded(error) from error
        except BaseException:
            _cancel(streams)
            raise
        if echo is not None:
            firsts = [_echoed(first, echo) for first in firsts]
        return Choices(streams, firsts)

    # -- routes -----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "rayfoundry"}
                                           for m in self.servers]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        token_ids = self._token_ids(body)
        echo = self.prompts[body.model].decode(token_ids) if body.echo else None
        choices = await self._choices(body, token_ids, echo)
        meta = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": body.model}
        if body.stream:
            return _EventStream(_stream_completion(meta, choices, body), choices)
        return await _whole(_whole_completion(meta, choices, body), choices)

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._authorize(request)
        choices = await self._choices(body, self._token_ids(body))
        meta = {"id": new_id("chatcmpl"), "created": now(), "model": body.model}
        if body.stream:
            return _EventStream(_stream_chat(meta, choices, body), choices)
        return await _whole(_whole_chat(meta, choices, body), choices)
