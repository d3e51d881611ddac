"""Chat workloads for the serving benchmark, as sessions: each session is a list of chat requests
sent one after another (a conversation), sessions run concurrently.

- multi_tenant: each request is one tenant's long system prompt and a short question (tenants
  chosen at random), the workload where routing by cached prefix pays.
- multi_turn: conversations whose every turn resends the history so far.
- random: unrelated prompts, nothing to share.

Text is made of whole words from the tokenizer's vocabulary, so its token count is close to the
word count and every run with the same seed sends the same bytes.
"""
from __future__ import annotations

import random
from typing import Literal

from pydantic import Field

from cluster.config import StrictConfig

Messages = list[dict[str, str]]
Session = list[Messages]


class WorkloadConfig(StrictConfig):
    kind: Literal["multi_tenant", "multi_turn", "random"] = "multi_tenant"
    requests: int = Field(256, ge=1, description="chat requests in all (multi_turn: sessions x turns)")
    tenants: int = Field(8, ge=1, description="multi_tenant: distinct system prompts")
    system_prompt_words: int = Field(512, ge=1)
    question_words: tuple[int, int] = Field((8, 24), description="a question's length, min and max words")
    turns: int = Field(4, ge=1, description="multi_turn: turns per conversation")
    answer_words: int = Field(48, ge=1, description="multi_turn: the canned assistant reply each turn adds")
    seed: int = 0


def word_list(tokenizer, size: int = 4000) -> list[str]:
    """Vocabulary entries that decode to one plain lowercase word after a space."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if len(text) > 3 and text[0] == " " and text[1:].isalpha() and text[1:].islower():
            words.append(text[1:])
            if len(words) == size:
                break
    if len(words) < 100:
        raise ValueError("the tokenizer's vocabulary has too few plain words to build prompts from")
    return words


def _text(rng: random.Random, words: list[str], count: int) -> str:
    return " ".join(rng.choice(words) for _ in range(count))


def _question(rng: random.Random, words: list[str], config: WorkloadConfig) -> str:
    return _text(rng, words, rng.randint(*config.question_words)) + "?"


def build_sessions(config: WorkloadConfig, words: list[str]) -> list[Session]:
    rng = random.Random(config.seed)
    if config.kind == "multi_tenant":
        systems = [f"You are the assistant of tenant {t}. " + _text(rng, words, config.system_prompt_words)
                   for t in range(config.tenants)]
        return [[[{"role": "system", "content": rng.choice(systems)},
                  {"role": "user", "content": _question(rng, words, config)}]] for _ in range(config.requests)]
    if config.kind == "random":
        return [[[{"role": "user", "content": _text(rng, words, config.system_prompt_words)
                   + " " + _question(rng, words, config)}]] for _ in range(config.requests)]
    sessions = []
    for _ in range(max(1, config.requests // config.turns)):
        history: Messages = [{"role": "system", "content": _text(rng, words, config.system_prompt_words)}]
        turns = []
        for _ in range(config.turns):
            history = history + [{"role": "user", "content": _question(rng, words, config)}]
            turns.append(history)
            history = history + [{"role": "assistant", "content": _text(rng, words, config.answer_words)}]
        sessions.append(turns)
    return sessions
