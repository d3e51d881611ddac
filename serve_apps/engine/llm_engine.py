"""The engine: requests in, tokens out, one step at a time (schedule -> execute -> update)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from cluster.store import fetch
from serve_apps.engine.config import EngineConfig, encode_prompt
from serve_apps.engine.detokenizer import IncrementalDetokenizer
from serve_apps.engine.kv_cache_manager import KVCacheManager
from serve_apps.engine.metrics import EngineMetrics, StepStats
from serve_apps.engine.model_runner import ModelRunner, PromptLogprob
from serve_apps.engine.models.loader import check_tensor_parallel, kv_block_bytes, load_model
from serve_apps.engine.request import Request, Status
from serve_apps.engine.sampler import SampledToken, Sampler
from serve_apps.engine.sampling_params import SamplingParams
from serve_apps.engine.scheduler import Scheduler
from serve_apps.engine.models.tp_layout import rank_shards


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)  # all outputs so far
    logprobs: list[SampledToken] = field(default_factory=list)  # all outputs so far, if logprobs asked
    new_text: str = ""  # safe to stream: whole characters, never part of a stop string
    text: str = ""  # all text so far
    prompt_logprobs: list | None = None  # PromptLogprob per prompt token after the first, if asked
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class RoutingStats:
    """What a replica reports to its request router (Serve routing stats)."""

    kv_block_hashes: list[int]  # every block a prefix lookup can hit now
    num_requests: int  # running and waiting
    num_free_blocks: int


class LLMEngine:
    def __init__(self, model: str | Path, config: EngineConfig | None = None, metrics_sink=None,
                 tp_workers: str = "ray"):
        """`model`: a stored model's name, a folder or a URI (see cluster.store). With
        tensor_parallel_size > 1, ranks 1.. are Ray actors (`tp_workers="threads"`: threads of this
        process, for tests and benchmarks on one machine)."""
        self.config = config or EngineConfig()
        model_path = Path(fetch(str(model), "models"))
        self.model_config = model_config = AutoConfig.from_pretrained(model_path)
        shards = rank_shards(model_config, self.config.tensor_parallel_size)  # a size that cannot split fails here
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_model_len = self.config.max_model_len or model_config.max_position_embeddings
        # every rank caches as many blocks; rank 0 holds the most KV heads (shards are larger first)
        block_bytes = kv_block_bytes(model_config, self.config.block_size, getattr(torch, self.config.dtype),
                                     shards[0].kv_heads.size)
        num_blocks = self.config.num_blocks or int(self.config.kv_cache_memory_gib * 2**30 // block_bytes)
        self.runner = self._runner(model_path, shards, num_blocks, tp_workers)
        self.model = self.runner.model  # rank 0's share under tensor parallelism
        self.kv_cache = KVCacheManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.metrics = EngineMetrics(metrics_sink)
        self.eos_token_ids = {model_config.eos_token_id} if isinstance(model_config.eos_token_id, int) \
            else set(model_config.eos_token_id or [])
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    def _runner(self, model_path: Path, shards, num_blocks: int, tp_workers: str):
        if len(shards) > 1:
            from serve_apps.engine.tp_executor import TPExecutor
            check_tensor_parallel(model_path, self.model_config, shards)  # before any worker starts
            return TPExecutor(model_path, self.config, shards, num_blocks, tp_workers)
        model = load_model(model_path, getattr(torch, self.config.dtype), self.config.prepack_weights)
        return ModelRunner(model, num_blocks, self.config.block_size)

    def check_health(self) -> None:
        """Raise if a tensor-parallel worker died (one rank: nothing can have)."""
        if hasattr(self.runner, "check_health"):
            self.runner.check_health()

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (nothing to do for one rank)."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    # -- requests ---------------------------------------------------------------------------
    def new_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Request:
        """A checked request, not yet queued: a prompt that cannot be served fails here, before
        anything is allocated."""
        token_ids = encode_prompt(self.tokenizer, prompt)
        self._check_prompt(token_ids)
        return Request(request_id or f"req-{next(self._ids)}", token_ids, params or SamplingParams())

    def add(self, request: Request) -> None:
        """Queue a request made by `new_request`."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.detokenizers[request.request_id] = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                                       request.params.stop)
        self.scheduler.add(request)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        request = self.new_request(prompt, params, request_id)
        self.add(request)
        return request.request_id

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt: must contain at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens leave no room in the context of {self.max_model_len}")
        if len(token_ids) + 1 > self.kv_cache.capacity_tokens:
            raise ValueError(f"prompt: {len(token_ids)} tokens do not fit the KV cache "
                             f"({self.kv_cache.capacity_tokens} tokens)")
        vocab_size = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab_size:
            bad = next(t for t in token_ids if not 0 <= t < vocab_size)
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary (0 to {vocab_size - 1})")

    def abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, Status.FINISHED_ABORT)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def routing_stats(self) -> RoutingStats:
        """What a request router needs of this engine; safe to call from another thread while it steps."""
        scheduler = self.scheduler
        return RoutingStats(kv_block_hashes=self.kv_cache.pool.cached_hashes(),
                            num_requests=len(scheduler.running) + len(scheduler.waiting),
                            num_free_blocks=self.kv_cache.num_free_blocks)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        logits = self.runner.execute(out)
        sampled = self.sampler(logits.sample_logits, out.sampling_requests)
        self.scheduler.commit(out)
        self._store_prompt_logprobs(logits.prompt_logprobs)
        outputs = [self._update(request, token) for request, token in zip(out.sampling_requests, sampled)]
        self.metrics.on_step(self._step_stats())
        return outputs

    def _store_prompt_logprobs(self, computed: dict[str, tuple[int, list[PromptLogprob]]]) -> None:
        for request_id, (start, logprobs) in computed.items():
            # by position: a preempted request recomputes its prompt and must not count it twice
            self.requests[request_id].prompt_logprobs[start:] = logprobs

    def _step_stats(self) -> StepStats:
        prefix, scheduler = self.kv_cache.stats, self.scheduler
        return StepStats(num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                         kv_usage=self.kv_cache.usage, prefix_queried_tokens=prefix.queried_tokens,
                         prefix_hit_tokens=prefix.hit_tokens, num_preemptions=scheduler.num_preemptions)

    def _update(self, request: Request, token: SampledToken) -> RequestOutput:
        request.token_ids.append(token.token_id)
        if token.logprob is not None:
            request.output_logprobs.append(token)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        self.metrics.on_token(request)
        detokenizer = self.detokenizers[request.request_id]
        detokenizer.push(token.token_id)
        reason = Status.FINISHED_STOP if detokenizer.stopped else self._finish_reason(request, token.token_id)
        if reason is not None:
            self._finish(request, reason)
        finished = reason is not None
        return RequestOutput(
            request_id=request.request_id, new_token_ids=[token.token_id], finished=finished,
            finish_reason=reason.value if finished else None, token_ids=request.output_token_ids,
            logprobs=request.output_logprobs, new_text=detokenizer.take_new_text(finished=finished),
            text=detokenizer.text, num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=request.prompt_logprobs if request.params.prompt_logprobs is not None else None)

    def _finish(self, request: Request, status: Status) -> None:
        self.scheduler.finish(request, status)
        if status is Status.FINISHED_ABORT:
            self.metrics.on_abort(request)
        else:
            self.metrics.on_finish(request)
        self.requests.pop(request.request_id, None)
        self.detokenizers.pop(request.request_id, None)
        self.sampler.forget(request.request_id)

    def _finish_reason(self, request: Request, token_id: int) -> Status | None:
        params = request.params
        if (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids:
            return Status.FINISHED_STOP
        reached_max_tokens = params.max_tokens is not None and len(request.output_token_ids) >= params.max_tokens
        if reached_max_tokens or len(request.token_ids) >= self.max_model_len:
            return Status.FINISHED_LENGTH
        return None

    # -- synchronous use, for jobs -------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        requests = [self.new_request(prompt, params) for prompt in prompts]  # all or nothing: none queued
        for request in requests:                                               # before every one is checked
            self.add(request)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[request.request_id] for request in requests]


__all__ = ["LLMEngine", "RequestOutput", "RoutingStats"]
