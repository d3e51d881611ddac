"""From logits to the next token of each request: greedy or seeded sampling, and logprobs.

A request with a seed draws from its own torch.Generator, seeded once, so its text does not
depend on which other requests share the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.sampling import greedy_tokens
from serve_apps.engine.request import Request


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None  # only for requests that ask for logprobs (logprobs=0: the chosen token's)
    top_logprobs: dict[int, float] | None  # the n most likely tokens, when asked for


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask out tokens outside top-k, outside the top-p nucleus, or below min_p x the best."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def _has_penalties(params) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


def _apply_penalties(logits: torch.Tensor, request: Request) -> torch.Tensor:
    params = request.params
    if not _has_penalties(params):
        return logits
    logits = logits.clone()
    seen = torch.tensor(request.token_ids, dtype=torch.long)
    if params.repetition_penalty != 1.0:
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    outputs = torch.tensor(request.output_token_ids, dtype=torch.long)
    if len(outputs):
        counts = torch.bincount(outputs, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


class Sampler:
    def __init__(self):
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator | None:
        if request.params.seed is None:
            return None
        if request.request_id not in self._generators:
            self._generators[request.request_id] = torch.Generator().manual_seed(request.params.seed)
        return self._generators[request.request_id]

    def _choose(self, logits: torch.Tensor, request: Request) -> int:
        params = request.params
        logits = _apply_penalties(logits, request)
        if params.is_greedy:
            return int(logits.argmax())
        logits = _filter(logits / params.temperature, params.top_k, params.top_p, params.min_p)
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self._generator(request)))

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        argmax = greedy_tokens(logits).tolist()  # one call for the whole batch: most requests are greedy
        # A log-softmax over the vocabulary costs as much as the argmax: only rows that report logprobs pay it.
        wanted = [row for row, request in enumerate(requests) if request.params.logprobs is not None]
        logprobs = dict(zip(wanted, logits[wanted].float().log_softmax(-1))) if wanted else {}
        out = []
        for row, request in enumerate(requests):
            plain_greedy = request.params.is_greedy and not _has_penalties(request.params)
            token = argmax[row] if plain_greedy else self._choose(logits[row].float(), request)
            out.append(self._with_logprobs(token, logprobs.get(row), request.params.logprobs))
        return out

    @staticmethod
    def _with_logprobs(token: int, logprobs: torch.Tensor | None, top_n: int | None) -> SampledToken:
        if logprobs is None:
            return SampledToken(token, None, None)
        top = None
        if top_n:
            values, ids = logprobs.topk(top_n)
            top = dict(zip(ids.tolist(), values.tolist()))
        return SampledToken(token, float(logprobs[token]), top)
