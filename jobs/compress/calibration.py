"""Calibration: run sample text through the model and gather statistics of chosen linears' inputs.

Activation-aware methods see each layer's inputs X ([tokens, in_features]) only through these:
- hessian: X^T X / tokens, float32 [in, in] (GPTQ, SparseGPT)
- sq_norm: sum over tokens of x_j^2, [in] (Wanda's ||X_j||_2 is its square root)
- abs_mean, abs_max: mean and max of |x_j| over tokens, [in] (AWQ, SmoothQuant, min-max observers)
- samples: up to `max_samples` input rows drawn evenly from all batches, [rows, in] (AWQ's error
  search, percentile observers)
Statistics are taken from the model as given, in one pass: every layer sees the inputs of the
uncompressed model before it (not of already-compressed earlier layers).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from cluster.config import StrictConfig

KINDS = frozenset({"hessian", "sq_norm", "abs_mean", "abs_max", "samples"})
_TENSOR_KINDS = ("hessian", "sq_norm", "abs_mean", "abs_max", "samples")  # InputStats' tensor fields


class CalibrationConfig(StrictConfig):
    data: str = Field(description="prepared dataset name, path or URI")
    split: str = "train"
    samples: int = Field(64, ge=1, description="sequences")
    seq_len: int = Field(512, ge=2, description="tokens per sequence")
    batch_size: int = Field(4, ge=1)
    max_samples: int = Field(512, ge=1, description="input rows kept per layer for `samples`")
    # sequential: each step calibrates on the model as the earlier steps left it, so it sees the
    #   inputs it will really get (the errors of earlier compressed layers included); one pass per step.
    # original: one pass over the untouched model serves every step, and can be computed once and
    #   reused by every recipe tried on the model (stats_cache); later steps then see the inputs of the
    #   uncompressed model, not those the earlier steps' compression leaves them.
    stats_from: Literal["sequential", "original"] = Field(
        "sequential", description="calibrate each step on the model as earlier steps left it, or all on the original")


@dataclass
class InputStats:
    """One layer's input statistics. While batches are still coming (`is_final` False) `hessian` and
    `abs_mean` hold sums over tokens and the sampled rows wait in `_rows`: in that form statistics of
    different batches merge exactly. `finish` turns them into means once, after the last batch."""

    tokens: int = 0
    hessian: torch.Tensor | None = None
    sq_norm: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    _rows: list[torch.Tensor] = field(default_factory=list, repr=False)
    is_final: bool = False

    def kinds(self) -> frozenset[str]:
        """The statistics present (`samples` counts while its rows are still being gathered)."""
        present = {kind for kind in _TENSOR_KINDS if getattr(self, kind) is not None}
        return frozenset(present | ({"samples"} if self._rows else set()))

    def merge(self, other: InputStats) -> InputStats:
        """The statistics of both inputs' batches together, self's first; neither input changes.
        Merging batch by batch in order gives one pass's result bit for bit; grouping the batches
        otherwise only regroups the float additions of the sums."""
        if self.is_final or other.is_final:
            raise ValueError("finished statistics hold means and cannot be merged; merge before finish()")
        if self.tokens and other.tokens and self.kinds() != other.kinds():
            raise ValueError(f"cannot merge statistics of kinds {sorted(self.kinds())} and {sorted(other.kinds())}")
        return InputStats(tokens=self.tokens + other.tokens,
                          hessian=_sum(self.hessian, other.hessian), sq_norm=_sum(self.sq_norm, other.sq_norm),
                          abs_mean=_sum(self.abs_mean, other.abs_mean),
                          abs_max=_combine(torch.maximum, self.abs_max, other.abs_max),
                          _rows=self._rows + other._rows)

    def finish(self) -> InputStats:
        """The final statistics: sums over tokens become means, the sampled rows one tensor."""
        if self.is_final:
            raise ValueError("statistics are already finished")
        return InputStats(tokens=self.tokens, hessian=_mean(self.hessian, self.tokens), sq_norm=self.sq_norm,
                          abs_mean=_mean(self.abs_mean, self.tokens), abs_max=self.abs_max,
                          samples=torch.cat(self._rows) if self._rows else None, is_final=True)


def _combine(op, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else op(a, b)


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return _combine(torch.add, a, b)


def _mean(total: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    return None if total is None else total / tokens


def batch_stats(x: torch.Tensor, kinds: frozenset[str], sample_every: int) -> InputStats:
    """The partial statistics of one batch's inputs x [tokens, in]."""
    stats = InputStats(tokens=x.shape[0])
    if "hessian" in kinds:
        stats.hessian = x.T @ x
    if "sq_norm" in kinds:
        stats.sq_norm = x.square().sum(0)
    if kinds & {"abs_mean", "abs_max"}:
        magnitude = x.abs()
        stats.abs_mean, stats.abs_max = magnitude.sum(0), magnitude.amax(0)
    if "samples" in kinds:
        stats._rows = [x[::sample_every].clone()]
    return stats


class _Collector:
    """A forward pre-hook that merges each batch's statistics of its layer's input into a running total."""

    def __init__(self, kinds: frozenset[str], sample_every: int):
        self.kinds, self.sample_every, self.stats = kinds, sample_every, InputStats()

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.stats = self.stats.merge(batch_stats(x, self.kinds, self.sample_every))


def token_batches(tokens: torch.Tensor, config: CalibrationConfig) -> list[torch.Tensor]:
    """`samples` consecutive sequences of `seq_len` tokens, in batches of `batch_size`."""
    needed = config.samples * config.seq_len
    if tokens.numel() < needed:
        raise ValueError(f"calibration needs {needed} tokens ({config.samples} x {config.seq_len}); "
                         f"the {config.split} split has {tokens.numel()}")
    sequences = tokens[:needed].long().view(config.samples, config.seq_len)
    return list(torch.split(sequences, config.batch_size))


def sample_stride(batches: list[torch.Tensor], max_samples: int) -> int:
    """Every how many input rows one is kept for `samples`, so that about `max_samples` are kept in all."""
    return max(1, sum(b.numel() for b in batches) // max_samples)


def _known(kinds: Iterable[str]) -> frozenset[str]:
    kinds = frozenset(kinds)
    if unknown := kinds - KINDS:
        raise ValueError(f"unknown calibration statistics {sorted(unknown)}; known: {sorted(KINDS)}")
    return kinds


@torch.inference_mode()
def collect_partial(model: nn.Module, layers: dict[str, nn.Module], kinds: Iterable[str], batches: list[torch.Tensor],
                    sample_every: int, progress: bool = True) -> dict[str, InputStats]:
    """Unfinished statistics of each named layer's input over `batches`: parts collected over different
    batches with the same `sample_every` merge into the statistics of all of them."""
    kinds = _known(kinds)
    collectors = {name: _Collector(kinds, sample_every) for name in layers}
    handles = [layer.register_forward_pre_hook(collectors[name]) for name, layer in layers.items()]
    try:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: c.stats for name, c in collectors.items()}


def collect(model: nn.Module, layers: dict[str, nn.Module], kinds: Iterable[str], batches: list[torch.Tensor],
            max_samples: int = 512, progress: bool = True) -> dict[str, InputStats]:
    """Statistics of each named layer's input over `batches` of token ids ([batch, seq] each)."""
    partial = collect_partial(model, layers, kinds, batches, sample_stride(batches, max_samples), progress)
    return {name: stats.finish() for name, stats in partial.items()}


def stats_to_tensors(stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
    """Flat `<layer>/<field>` tensors for safetensors: each statistic present, plus 0-d `tokens` and
    `is_final`. Unfinished sampled rows are stored joined, which merges and finishes the same."""
    tensors = {}
    for layer, s in stats.items():
        tensors[f"{layer}/tokens"] = torch.tensor(s.tokens, dtype=torch.int64)
        tensors[f"{layer}/is_final"] = torch.tensor(s.is_final, dtype=torch.bool)
        values = {kind: getattr(s, kind) for kind in _TENSOR_KINDS}
        if s._rows:
            values["samples"] = torch.cat(s._rows)
        tensors.update({f"{layer}/{kind}": v.contiguous() for kind, v in values.items() if v is not None})
    return tensors


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, InputStats]:
    """The statistics `stats_to_tensors` flattened."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, name = key.rpartition("/")
        by_layer.setdefault(layer, {})[name] = value
    return {layer: _stats_of(values) for layer, values in by_layer.items()}


def _stats_of(values: dict[str, torch.Tensor]) -> InputStats:
    is_final = bool(values.pop("is_final"))
    stats = InputStats(tokens=int(values.pop("tokens")), is_final=is_final)
    samples = values.pop("samples", None)
    if samples is not None and not is_final:
        stats._rows = [samples]
    elif samples is not None:
        stats.samples = samples
    for kind, value in values.items():
        if kind not in _TENSOR_KINDS:
            raise ValueError(f"unknown statistic {kind!r} among stored calibration statistics")
        setattr(stats, kind, value)
    return stats
