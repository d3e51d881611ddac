"""Incremental detokenization for streaming, and stop strings.

Decoding token by token would split characters that span several byte-level tokens (emoji,
CJK) into replacement characters. Instead, each step decodes a short window of recent tokens
twice -- up to the last emitted token, and up to the new one -- and emits the difference only
once it no longer ends in an incomplete character (U+FFFD).

Text that could still turn into a stop string is held back, so a client never receives part
of a stop string; when one appears, the text is cut just before it.
"""
from __future__ import annotations

INCOMPLETE = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded along, so the first word gets its leading space right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.ids)  # tokens before this are already in self.text
        self.text = ""
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        """Add a generated token; may complete characters and may hit a stop string."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            start = len(self.text)
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._check_stop(start)

    def _check_stop(self, new_from: int) -> None:
        search_from = max(0, new_from - self.hold)
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True

    def take_new_text(self, finished: bool) -> str:
        """Text not yet handed out, minus a tail that may still become a stop string."""
        end = len(self.text) if finished or self.stopped else max(self.emitted, len(self.text) - self.hold)
        new, self.emitted = self.text[self.emitted : end], end
        return new
