"""Synthetic prompts every engine in a run receives identically."""
from __future__ import annotations

import random


def random_prompts(count: int, length: int, vocab: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    """Token ids from the vocabulary's ordinary range (clear of the special tokens at its start)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(100, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(100, vocab) for _ in range(length)] for _ in range(count)]
