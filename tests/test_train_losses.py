"""Training objectives against torch's own definitions."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from jobs.train.losses import LossConfig, divergence, training_loss


def outputs(logits, hidden=None):
    return SimpleNamespace(logits=logits, hidden_states=None if hidden is None else (hidden,))


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randint(0, 50, (2, 9)), torch.randn(2, 9, 50) * 3, torch.randn(2, 9, 50) * 3


def test_alpha_zero_is_next_token_cross_entropy(batch):
    ids, student, _ = batch
    parts = training_loss(LossConfig(alpha=0.0), ids, outputs(student))
    torch.testing.assert_close(parts["loss"], F.cross_entropy(student[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)))


def test_forward_kl_is_torchs_kl_div_and_scales_by_t_squared(batch):
    ids, student, teacher = batch
    t = 2.0
    expected_kl = F.kl_div(F.log_softmax(student / t, -1).flatten(0, 1), F.log_softmax(teacher / t, -1).flatten(0, 1),
                           log_target=True, reduction="batchmean")
    torch.testing.assert_close(divergence(student, teacher, t, "forward_kl"), expected_kl)
    config = LossConfig(alpha=0.25, temperature=t)
    parts = training_loss(config, ids, outputs(student), outputs(teacher))
    torch.testing.assert_close(parts["loss"], 0.75 * parts["ce"] + 0.25 * t * t * parts["kl"])


def test_reverse_kl_swaps_the_arguments_and_both_vanish_on_agreement(batch):
    _, student, teacher = batch
    torch.testing.assert_close(divergence(student, teacher, 1.0, "reverse_kl"),
                               divergence(teacher, student, 1.0, "forward_kl"))
    assert divergence(student, teacher, 1.0, "reverse_kl") != divergence(student, teacher, 1.0, "forward_kl")
    assert divergence(student, student, 1.0, "forward_kl").abs() < 1e-6


def test_hidden_mse_adds_the_last_hidden_states_distance(batch):
    ids, student, teacher = batch
    hs, ht = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    parts = training_loss(LossConfig(alpha=0.0, hidden_mse=0.5), ids, outputs(student, hs), outputs(teacher, ht))
    torch.testing.assert_close(parts["loss"], parts["ce"] + 0.5 * F.mse_loss(hs, ht))
