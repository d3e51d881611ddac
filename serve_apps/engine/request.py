"""A request's state as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from serve_apps.engine.block_hash import BlockHash
from serve_apps.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOP = "stop"  # a stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context
    FINISHED_ABORT = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    # Every token the request has: prompt, then outputs. The scheduler's one rule is to let
    # num_computed_tokens catch up with len(token_ids), in chunks, whatever the phase.
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held when first scheduled
    block_hashes: list[BlockHash] = field(default_factory=list)  # of its leading full blocks, each hashed once
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    output_logprobs: list = field(default_factory=list)  # one SampledToken per output token
    prompt_logprobs: list = field(default_factory=list)  # PromptLogprob per prompt token after the first

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
