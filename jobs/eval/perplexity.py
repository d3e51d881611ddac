"""Perplexity over non-overlapping windows of a token stream.

The stream is cut into consecutive windows of `window` tokens (a shorter last window counts if
it has two tokens or more). Each window is scored on its own, from a fresh context: every token
but the first is predicted from the ones before it in the same window. nll is the mean negative
log-likelihood per predicted token and ppl = exp(nll) -- what `model(ids, labels=ids).loss`
gives per window in transformers, averaged over all predicted tokens.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int  # tokens read from the stream
    predicted: int  # tokens scored: tokens minus one per window
    windows: int


def windows_of(tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    pieces = list(torch.split(tokens, window))
    return [p for p in pieces if len(p) >= 2]


def batches_of(windows: list[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack equal-length windows into batches; a shorter last window goes alone."""
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        full = [w for w in group if len(w) == len(group[0])]
        yield torch.stack(full)
        for w in group[len(full) :]:
            yield w.unsqueeze(0)


@torch.inference_mode()
def window_nll_sum(model: torch.nn.Module, batch: torch.Tensor) -> float:
    logits = model(input_ids=batch).logits
    targets = batch[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
    ).item()


@dataclass(frozen=True)
class Partial:
    """Perplexity so far: the first `windows` windows of the stream, as each batch is scored."""

    nll_sum: float
    predicted: int
    windows: int
    tokens: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.predicted


def perplexity_stream(model: torch.nn.Module, tokens: torch.Tensor, window: int = 512,
                      batch_size: int = 4) -> Iterator[Partial]:
    """The running totals after each batch of windows, so a caller can report (and stop) early."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    windows = windows_of(tokens.long().flatten(), window)
    if not windows:
        raise ValueError("need at least 2 tokens to measure perplexity")
    device = next(model.parameters()).device
    nll_sum, predicted, done, read = 0.0, 0, 0, 0
    for batch in batches_of(windows, batch_size):
        nll_sum += window_nll_sum(model, batch.to(device))
        predicted += batch.numel() - batch.shape[0]
        done, read = done + batch.shape[0], read + batch.numel()
        yield Partial(nll_sum, predicted, done, read)


def perplexity(
    model: torch.nn.Module, tokens: torch.Tensor, window: int = 512, batch_size: int = 4, progress=None
) -> Perplexity:
    last = None
    for partial in perplexity_stream(model, tokens, window, batch_size):
        if progress is not None:
            progress(partial.windows - (last.windows if last else 0))
        last = partial
    return Perplexity(math.exp(last.nll), last.nll, int(tokens.numel()), last.predicted, last.windows)
