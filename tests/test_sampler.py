"""Sampler pieces on hand-made logits: filters keep exactly the right tokens, penalties bite."""
import math

import torch

from serve_apps.engine.request import Request
from serve_apps.engine.sampler import Sampler, _apply_penalties, _filter
from serve_apps.engine.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k_top_p_min_p():
    assert kept(_filter(LOGITS, top_k=2, top_p=1.0, min_p=0.0)) == [0, 1]
    assert kept(_filter(LOGITS, top_k=-1, top_p=0.7, min_p=0.0)) == [0, 1]  # 0.5 + 0.25 crosses 0.7
    assert kept(_filter(LOGITS, top_k=-1, top_p=0.76, min_p=0.0)) == [0, 1, 2]
    assert kept(_filter(LOGITS, top_k=-1, top_p=1.0, min_p=0.3)) == [0, 1, 2]  # >= 0.15 = 0.3 * 0.5


def test_penalties_lower_what_was_said():
    request = Request("r", [0, 0], SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25))
    request.token_ids += [1, 1]  # two outputs of token 1
    out = _apply_penalties(LOGITS, request)
    assert out[0] == LOGITS[0] * 2.0  # prompt token: repetition penalty only (negative logit: times)
    assert math.isclose(out[1], LOGITS[1] * 2.0 - 0.5 * 2 - 0.25, rel_tol=1e-6)
    assert torch.equal(out[2:], LOGITS[2:])


def test_greedy_and_logprobs():
    sampler = Sampler()
    request = Request("r", [3], SamplingParams(temperature=0, logprobs=2))
    (token,) = sampler(LOGITS[None], [request])
    assert token.token_id == 0 and math.isclose(token.logprob, math.log(0.5), rel_tol=1e-5)
    assert list(token.top_logprobs) == [0, 1]


def test_batched_greedy_choice_is_torchs_argmax_ties_included():
    from kernels.sampling import greedy_tokens

    logits = torch.randn(7, 49152)
    logits[3, [5, 900, 40000]] = 50.0  # a three-way tie: the first index wins, as in torch
    logits[5, -3:] = 60.0  # the maximum in the scalar tail past the last full vector
    small = torch.randn(4, 10)  # fewer values than one vector
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert torch.equal(greedy_tokens(small), small.argmax(-1))
    assert greedy_tokens(logits)[3] == 5
