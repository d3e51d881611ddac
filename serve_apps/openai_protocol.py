"""The OpenAI HTTP API's request bodies (validated, unknown fields rejected) and response shapes.

Requests map onto the engine's SamplingParams, one per choice; responses are built from the
per-choice chunks an LLMServer streams (serve_apps/chunks.py), so streaming and non-streaming
replies are the same data assembled two ways.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from serve_apps.chunks import TokenLogprob
from serve_apps.engine.sampling_params import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # Beyond OpenAI, as vLLM accepts them:
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    def sampling_params(self, choice: int) -> SamplingParams:
        """What the engine generates choice `choice` with; raises ValueError for settings it refuses."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_new_tokens,  # None: to the end of the model's context
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + choice,  # n choices, n different draws
            stop=stop, ignore_eos=self.ignore_eos,
            logprobs=self.num_logprobs, prompt_logprobs=self.num_prompt_logprobs)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per generated token; None: no logprobs."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None  # echoed prompt tokens come with theirs


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


def _plain(message: ChatMessage) -> dict:
    return message.model_dump(exclude_none=True)


class ChatCompletionRequest(_Sampling):
    # Checked as ChatMessage, kept as plain dicts: what chat templates read, and what Ray's prefix
    # router reads from a request's arguments (it sees no text in other objects).
    messages: list[Annotated[ChatMessage, AfterValidator(_plain)]] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's legacy completions logprobs: parallel lists, text offsets from `offset`."""
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top or None for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top.items()]} for e in entries]}


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
