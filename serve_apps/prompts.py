"""Prompts to token ids, in the ingress: once per request, so the request router can hash the
prompt's blocks exactly as the engine will, and replicas receive token ids."""
from __future__ import annotations

from pathlib import Path

from cluster.store import fetch
from serve_apps.engine.config import encode_prompt


class PromptBuilder:
    def __init__(self, model: str):
        # transformers' tokenizer classes import torch (through its configuration module): imported
        # here, in the ingress replica, so that importing the ingress or the app builder does not.
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(Path(fetch(model, "models")))
        self.vocab_size = len(self.tokenizer)

    def completion(self, prompt: str | list[int]) -> list[int]:
        token_ids = encode_prompt(self.tokenizer, prompt)
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})")
        return token_ids

    def chat(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError("messages: this model has no chat template; use /v1/completions")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)
