"""What an LLMServer replica streams back for one choice, as plain data: the replica builds it from
the engine's outputs, the ingress assembles OpenAI's replies from it. Light (no torch, no HTTP
schema), so both sides import it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class Chunk:
    """New text of one choice since its last chunk, and the tokens behind it."""

    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Once, on the first chunk, when the params ask for them: one per prompt token.
    prompt_logprobs: list[TokenLogprob] | None = None
    replica: str = ""  # the Serve replica that generated it (X-Rayfoundry-Replica)
    num_cached_tokens: int = 0  # prompt tokens the replica's prefix cache held
