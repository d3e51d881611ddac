"""Sampling ops on logits: the greedy choice for a whole batch in one call."""
from __future__ import annotations

import torch

from kernels.cpu_ops import native_ops


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64: the first index of each row's largest logit (as torch.argmax)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 \
            and logits.stride(-1) == 1 and (ops := native_ops()) is not None:
        return ops.argmax_rows(logits)
    return logits.argmax(-1)
