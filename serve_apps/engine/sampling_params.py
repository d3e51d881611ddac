"""What a request asks of generation; validated before anything is allocated."""
from __future__ import annotations

from pydantic import Field, model_validator

from cluster.config import StrictConfig


class SamplingParams(StrictConfig):
    max_tokens: int | None = Field(16, ge=1, description="None: to the end of the model's context")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_k: int = Field(-1, ge=-1, description="-1 means off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="top-n logprobs per generated token")
    prompt_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_k_is_not_zero(self):
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (off) or at least 1")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
