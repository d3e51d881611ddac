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

import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from cluster.config import StrictConfig

KINDS = frozenset({"hessian", "sq_norm", "abs_mean", "abs_max", "samples"})


class CalibrationConfig(StrictConfig):
    data: str = Field(description="prepared dataset name, path or URI")
    split: str = "train"
    samples: int = Field(64, ge=1, description="sequences")
    seq_len: int = Field(512, ge=2, description="tokens per sequence")
    batch_size: int = Field(4, ge=1)
    max_samples: int = Field(512, ge=1, description="input rows kept per layer for `samples`")


@dataclass
class InputStats:
    tokens: int = 0
    hessian: torch.Tensor | None = None
    sq_norm: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    _rows: list[torch.Tensor] = field(default_factory=list, repr=False)


class _Collector:
    def __init__(self, kinds: frozenset[str], every: int):
        self.kinds, self.every, self.stats = kinds, every, InputStats()

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        s = self.stats
        if "hessian" in self.kinds:
            s.hessian = _add(s.hessian, x.T @ x)
        if "sq_norm" in self.kinds:
            s.sq_norm = _add(s.sq_norm, x.square().sum(0))
        if self.kinds & {"abs_mean", "abs_max"}:
            magnitude = x.abs()
            s.abs_mean = _add(s.abs_mean, magnitude.sum(0))
            s.abs_max = magnitude.amax(0) if s.abs_max is None else torch.maximum(s.abs_max, magnitude.amax(0))
        if "samples" in self.kinds:
            s._rows.append(x[:: self.every].clone())
        s.tokens += x.shape[0]

    def finish(self) -> InputStats:
        s = self.stats
        if s.hessian is not None:
            s.hessian /= s.tokens
        if s.abs_mean is not None:
            s.abs_mean /= s.tokens
        if s._rows:
            s.samples, s._rows = torch.cat(s._rows), []
        return s


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total.add_(value)


def token_batches(tokens: torch.Tensor, config: CalibrationConfig) -> list[torch.Tensor]:
    """`samples` consecutive sequences of `seq_len` tokens, in batches of `batch_size`."""
    needed = config.samples * config.seq_len
    if tokens.numel() < needed:
        raise ValueError(f"calibration needs {needed} tokens ({config.samples} x {config.seq_len}); "
                         f"the {config.split} split has {tokens.numel()}")
    sequences = tokens[:needed].long().view(config.samples, config.seq_len)
    return list(torch.split(sequences, config.batch_size))


@torch.inference_mode()
def collect(model: nn.Module, layers: dict[str, nn.Module], kinds: Iterable[str], batches: list[torch.Tensor],
            max_samples: int = 512, progress: bool = True) -> dict[str, InputStats]:
    """Statistics of each named layer's input over `batches` of token ids ([batch, seq] each)."""
    kinds = frozenset(kinds)
    if unknown := kinds - KINDS:
        raise ValueError(f"unknown calibration statistics {sorted(unknown)}; known: {sorted(KINDS)}")
    rows = sum(b.numel() for b in batches)
    collectors = {name: _Collector(kinds, max(1, rows // max_samples)) for name in layers}
    handles = [layer.register_forward_pre_hook(collectors[name]) for name, layer in layers.items()]
    try:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: c.finish() for name, c in collectors.items()}
