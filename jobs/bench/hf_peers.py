"""Hugging Face transformers as peers: generate one at a time, one padded batch, generate_batch."""
from __future__ import annotations

import time

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from jobs.bench.measure import Measured, mean


class _TokenClock(BaseStreamer):
    """Times the tokens `generate` emits (its first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value):
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self):
        pass


def _greedy(max_tokens: int) -> dict:
    # min_new_tokens keeps every engine producing exactly max_tokens, as ignore_eos does elsewhere
    return dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)


@torch.inference_mode()
def hf_one_at_a_time(model, scenario: str, prompts: list[list[int]], max_tokens: int) -> Measured:
    start, ttfts, outputs, decode_rates = time.perf_counter(), [], 0, []
    for prompt in prompts:
        clock, began = _TokenClock(), time.perf_counter()
        out = model.generate(torch.tensor([prompt]), streamer=clock, **_greedy(max_tokens))
        outputs += out.shape[1] - len(prompt)
        ttfts.append(clock.times[0] - began)
        decode_rates.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    return Measured("hf-generate-1-at-a-time", scenario, len(prompts), 1, outputs, sum(map(len, prompts)),
                    time.perf_counter() - start, mean(ttfts), mean(decode_rates))


@torch.inference_mode()
def hf_padded_batch(model, scenario: str, prompts: list[list[int]], max_tokens: int) -> Measured:
    assert len({len(p) for p in prompts}) == 1, "equal-length prompts: no padding to skew the comparison"
    start = time.perf_counter()
    out = model.generate(torch.tensor(prompts), **_greedy(max_tokens))
    seconds = time.perf_counter() - start
    return Measured("hf-generate-padded-batch", scenario, len(prompts), len(prompts),
                    int((out.shape[1] - len(prompts[0])) * len(prompts)), sum(map(len, prompts)), seconds,
                    note="TTFT not observable: the batch returns at once")


def hf_generate_batch(model, scenario: str, prompts: list[list[int]], max_tokens: int) -> Measured:
    # not under inference_mode: generate_batch updates its own tensors in place from another thread
    config = GenerationConfig(**_greedy(max_tokens), eos_token_id=None)
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    seconds = time.perf_counter() - start
    outputs = sum(len(r.generated_tokens) for r in results.values())
    return Measured("hf-generate_batch", scenario, len(prompts), len(prompts), outputs, sum(map(len, prompts)),
                    seconds, note="transformers' continuous batching")
