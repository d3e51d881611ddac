"""Continuous batching with one rule.

Every request has `token_ids` (prompt, then outputs) and `num_computed_tokens`; each step lets
the second catch up with the first, within a per-step token budget. A long prompt is therefore
prefilled in chunks across steps, mixed with other requests' one-token decodes, and a prefix
cache hit simply starts a request with some tokens already computed.

Order: running requests first, oldest first; then waiting requests, first come first served.
When the pool runs out of blocks, the newest running request is preempted: its blocks are freed
and it returns to the front of the queue to be recomputed (its blocks usually still sit in the
prefix cache). The oldest running request can always proceed, because a request that cannot fit
in the whole cache is refused when it is added: no deadlock.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from serve_apps.engine.kv_cache_manager import NO_PREFIX, KVCacheManager
from serve_apps.engine.request import Request, Status


@dataclass(frozen=True)
class Scheduled:
    """One request's share of a step: what the model computes for it, and where its KV lives."""

    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens when scheduled: this step computes token_ids[start:start+n]
    completes_sequence: bool  # every token computed after this step: the next one is sampled
    block_ids: list[int]  # the request's block table, covering token_ids[:start+n]

    @classmethod
    def of(cls, request: Request, num_new_tokens: int, block_ids: list[int]) -> Scheduled:
        start = request.num_computed_tokens
        return cls(request, num_new_tokens, start, start + num_new_tokens == len(request.token_ids), block_ids)

    @property
    def new_token_ids(self) -> list[int]:
        return self.request.token_ids[self.start : self.start + self.num_new_tokens]

    @property
    def num_prompt_logprob_rows(self) -> int:
        """Positions this step computes whose next prompt token's logprob was asked for."""
        request = self.request
        if request.params.prompt_logprobs is None:
            return 0
        return max(0, min(self.start + self.num_new_tokens, request.num_prompt_tokens - 1) - self.start)


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # ended or preempted since the last step that ran: tensor-parallel workers forget them
    forget_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def sampling_requests(self) -> list[Request]:
        """The requests whose next token this step samples, in batch order."""
        return [s.request for s in self.scheduled if s.completes_sequence]


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._forget_ids: list[str] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # no room was just made by preempting: don't refill it at once
            self._admit_waiting(out, budget)
        if out.scheduled:  # an empty step runs nothing, so its news waits for the next that runs
            out.forget_ids, self._forget_ids = self._forget_ids, []
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_uncomputed_tokens, budget)
            if self.kv.allocate(request.request_id, request.num_computed_tokens + num_new):
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1
            else:
                victim = self.running.pop()  # the newest; possibly `request` itself
                self._preempt(victim)
                out.preempted.append(victim)
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            wants_prompt_logprobs = request.params.prompt_logprobs is not None
            prefix = NO_PREFIX if wants_prompt_logprobs else self.kv.find_cached_prefix(request)
            num_new = min(len(request.token_ids) - prefix.num_tokens, budget)
            if not self.kv.allocate(request.request_id, prefix.num_tokens + num_new, prefix):
                return  # FCFS: nobody overtakes the head of the queue
            self.kv.record_prefix_lookup(len(request.token_ids), prefix.num_tokens)
            self._start(request, prefix.num_tokens)
            self.running.append(self.waiting.popleft())
            out.scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

    @staticmethod
    def _start(request: Request, num_cached_tokens: int) -> None:
        request.num_computed_tokens = num_cached_tokens
        request.status = Status.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            request.num_cached_tokens = num_cached_tokens

    def _scheduled(self, request: Request, num_new_tokens: int) -> Scheduled:
        return Scheduled.of(request, num_new_tokens, self.kv.block_ids(request.request_id))

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._forget_ids.append(request.request_id)  # its blocks are gone: sent in full when rescheduled
        self.waiting.appendleft(request)

    def commit(self, out: SchedulerOutput) -> None:
        """The step ran: its tokens are computed, and full blocks become shareable."""
        for item in out.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(request)

    def finish(self, request: Request, status: Status) -> None:
        """End a request (done or aborted), wherever it is, and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = status
        self._forget_ids.append(request.request_id)
