"""Our engine, driven the way a server drives it: all requests queued, steps until done."""
from __future__ import annotations

import time

from jobs.bench.measure import Measured, mean
from serve_apps.engine.llm_engine import LLMEngine
from serve_apps.engine.sampling_params import SamplingParams


def run_engine(engine: LLMEngine, name: str, scenario: str, prompts: list[list[int]], max_tokens: int) -> Measured:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for prompt in prompts:
        engine.add_request(prompt, params)
    first, last, outputs = {}, {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            now = time.perf_counter()
            first.setdefault(output.request_id, now)
            last[output.request_id] = now
            outputs += len(output.new_token_ids)
    seconds = time.perf_counter() - start
    # Decode rate once every request has its first token: all of them decoding together.
    all_started, all_done = max(first.values()), max(last.values())
    decode = (outputs - len(first)) / (all_done - all_started) if all_done > all_started else None
    return Measured(name, scenario, len(prompts), len(prompts), outputs, sum(map(len, prompts)), seconds,
                    mean(t - start for t in first.values()), decode)
