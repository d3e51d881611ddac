"""The one message a step sends to every tensor-parallel worker, and both ends of it.

Workers hold no scheduler: they compute what rank 0's scheduler decided. A request is sent in
full the first time it is scheduled (all its tokens, its block table); after that only what grew
(tokens sampled since, new blocks), then its id once it ends. A preempted request lost its blocks,
so it is sent in full again when it is scheduled again. At decode a request costs a few integers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from serve_apps.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class CachedRequest:
    request_id: str
    new_token_ids: tuple[int, ...]  # appended since last sent
    new_block_ids: tuple[int, ...]


@dataclass(frozen=True)
class ScheduledEntry:
    """One request's share of the step, in batch order (as rank 0's Scheduled)."""

    request_id: str
    start: int
    num_new_tokens: int
    completes_sequence: bool
    num_prompt_logprob_rows: int


@dataclass(frozen=True)
class StepMessage:
    new: tuple[NewRequest, ...]
    cached: tuple[CachedRequest, ...]
    schedule: tuple[ScheduledEntry, ...]
    forget_ids: tuple[str, ...]  # ended or preempted since the last message


@dataclass(frozen=True)
class StepItem:
    """What a worker's model runner needs of a scheduled request (the face of rank 0's Scheduled)."""

    new_token_ids: list[int]
    start: int
    num_new_tokens: int
    completes_sequence: bool
    num_prompt_logprob_rows: int
    block_ids: list[int]


class StepMessageBuilder:
    """Rank 0's side: remembers what each worker already knows of each request."""

    def __init__(self):
        self._sent: dict[str, tuple[int, int]] = {}  # request id -> (tokens, blocks) workers hold

    def build(self, out: SchedulerOutput) -> StepMessage:
        for request_id in out.forget_ids:
            self._sent.pop(request_id, None)
        new, cached = [], []
        for item in out.scheduled:
            request, blocks = item.request, item.block_ids
            sent = self._sent.get(request.request_id)
            if sent is None:
                new.append(NewRequest(request.request_id, tuple(request.token_ids), tuple(blocks)))
            elif len(request.token_ids) > sent[0] or len(blocks) > sent[1]:
                cached.append(CachedRequest(request.request_id, tuple(request.token_ids[sent[0]:]),
                                            tuple(blocks[sent[1]:])))
            self._sent[request.request_id] = (len(request.token_ids), len(blocks))
        schedule = tuple(ScheduledEntry(item.request.request_id, item.start, item.num_new_tokens,
                                        item.completes_sequence, item.num_prompt_logprob_rows)
                         for item in out.scheduled)
        return StepMessage(tuple(new), tuple(cached), schedule, tuple(out.forget_ids))


@dataclass
class WorkerRequests:
    """A worker's side: each live request's tokens and block table, kept current by the messages."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    blocks: dict[str, list[int]] = field(default_factory=dict)

    def apply(self, message: StepMessage) -> list[StepItem]:
        for request_id in message.forget_ids:
            self.tokens.pop(request_id, None)
            self.blocks.pop(request_id, None)
        for request in message.new:
            self.tokens[request.request_id] = list(request.token_ids)
            self.blocks[request.request_id] = list(request.block_ids)
        for request in message.cached:
            self.tokens[request.request_id] += request.new_token_ids
            self.blocks[request.request_id] += request.new_block_ids
        return [self._item(entry) for entry in message.schedule]

    def _item(self, entry: ScheduledEntry) -> StepItem:
        tokens = self.tokens[entry.request_id]
        return StepItem(tokens[entry.start : entry.start + entry.num_new_tokens], entry.start, entry.num_new_tokens,
                        entry.completes_sequence, entry.num_prompt_logprob_rows, self.blocks[entry.request_id])
