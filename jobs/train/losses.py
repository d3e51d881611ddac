"""Training objectives over next-token logits.

Distillation follows the seed articles: (1 - alpha) * CE(student, labels) + alpha * T^2 * KL, with
KL(softmax(z_t / T) || softmax(z_s / T)) (forward: the student covers all the teacher's mass) or the
reverse KL(student || teacher) (mode-seeking); the T^2 keeps gradient sizes comparable across T.
An optional mean-squared error between the last hidden states adds a feature-matching term.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from cluster.config import StrictConfig


class LossConfig(StrictConfig):
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the teacher term; 0 is cross-entropy alone")
    temperature: float = Field(1.0, gt=0)
    divergence: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    hidden_mse: float = Field(0.0, ge=0, description="weight of MSE between last hidden states")

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.hidden_mse > 0


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """Mean per-token KL between the tempered distributions, in nats."""
    log_s = F.log_softmax(student.float() / temperature, -1)
    log_t = F.log_softmax(teacher.float() / temperature, -1)
    if kind == "forward_kl":
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    return per_token.mean()


def training_loss(config: LossConfig, ids: torch.Tensor, student_out, teacher_out=None) -> dict[str, torch.Tensor]:
    """{"loss": what to minimize, and its parts} for one batch of token windows."""
    ce = next_token_ce(student_out.logits, ids)
    parts = {"ce": ce}
    loss = (1 - config.alpha) * ce
    if config.alpha > 0:
        kl = divergence(student_out.logits[:, :-1], teacher_out.logits[:, :-1], config.temperature, config.divergence)
        parts["kl"] = kl
        loss = loss + config.alpha * config.temperature**2 * kl
    if config.hidden_mse > 0:
        mse = F.mse_loss(student_out.hidden_states[-1].float(), teacher_out.hidden_states[-1].float())
        parts["hidden_mse"] = mse
        loss = loss + config.hidden_mse * mse
    parts["loss"] = loss
    return parts
