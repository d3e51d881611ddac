"""Decode tokens/s of a stored checkpoint on our engine: the same random prompts for every model."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from jobs.bench.ours import run_engine
from jobs.bench.workloads import random_prompts
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine


def decode_rates(path: Path, engine_config: EngineConfig, batch_sizes: list[int], prompt_tokens: int,
                 max_tokens: int) -> dict[int, float | None]:
    """Greedy decode tokens/s at each batch size (EOS ignored), after a short warm-up; the prompts
    depend only on the batch size and the vocabulary, so models compare like for like."""
    engine = LLMEngine(path, engine_config)
    vocab = AutoConfig.from_pretrained(path).vocab_size
    run_engine(engine, "warm-up", "warm-up", random_prompts(2, 8, vocab, seed=99), 4)
    return {n: run_engine(engine, "ours", f"batch {n}", random_prompts(n, prompt_tokens, vocab, seed=n),
                          max_tokens).decode_tokens_per_s
            for n in batch_sizes}
