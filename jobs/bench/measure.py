"""One measured run of one engine on one scenario."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Measured:
    engine: str
    scenario: str
    requests: int
    concurrency: int
    output_tokens: int
    prompt_tokens: int
    seconds: float
    mean_ttft_s: float | None = None
    decode_tokens_per_s: float | None = None  # tokens after each request's first / time once all have one
    note: str = ""
    round: int = 0  # which repetition of the scenario, when engines take turns

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def row(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
