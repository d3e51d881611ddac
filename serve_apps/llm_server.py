"""One engine per Serve replica: token ids and SamplingParams in, a stream of Chunks out.

The ingress tokenizes (serve_apps/prompts.py) and builds the params, so the router can hash
prompts and the replica never sees HTTP; the replica reports the block hashes its prefix cache
holds as Serve routing stats. A stream that its caller abandons (the client went away) is
cancelled by the ingress (serve_apps/ingress.py, Choices), and the engine aborts the request,
freeing its KV blocks.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ray import serve

from serve_apps.chunks import Chunk, TokenLogprob
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from serve_apps.engine.llm_engine import RequestOutput


class LLMServer:
    """The deployment's class; serve_apps.app wraps it with serve.deployment and its options."""

    def __init__(self, model_id: str, model: str, engine_config: EngineConfig):
        """model_id: the name clients use (metrics carry it); model: what to load (cluster.store)."""
        # The engine (torch, the model runner) is imported here, in the replica, so that building
        # the app or importing the ingress does not load it.
        from serve_apps.engine.async_engine import AsyncLLMEngine
        from serve_apps.engine.llm_engine import LLMEngine
        from serve_apps.engine.metrics import RayMetricsSink

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        sink = RayMetricsSink(model_id, self.replica_id)
        self.engine = AsyncLLMEngine(LLMEngine(model, engine_config, metrics_sink=sink))
        self.tokenizer = self.engine.engine.tokenizer

    async def generate(self, token_ids: list[int], params: SamplingParams,
                       client_prompt: str | list | None = None) -> AsyncIterator[Chunk]:
        """Stream one choice. Called by keyword, for request routers: ours hash `token_ids`; Ray's
        prefix router matches the text of `client_prompt` (the prompt or messages as the client
        sent them), which the replica does not read."""
        first = True
        async for output in self.engine.generate(token_ids, params):
            yield self._chunk(output, token_ids, params, first)
            first = False

    def _chunk(self, output: RequestOutput, prompt_ids: list[int], params: SamplingParams, first: bool) -> Chunk:
        chunk = Chunk(output.new_text, len(prompt_ids), len(output.token_ids), output.finish_reason,
                      replica=self.replica_id, num_cached_tokens=output.num_cached_tokens)
        if params.logprobs is not None:
            new = output.logprobs[len(output.logprobs) - len(output.new_token_ids):]
            chunk.logprobs = [self._entry(s.token_id, s.logprob, s.top_logprobs) for s in new]
        if first and output.prompt_logprobs is not None:
            chunk.prompt_logprobs = [TokenLogprob(self._token(prompt_ids[0]), None)] + [
                self._entry(p.token_id, p.logprob, p.top_logprobs) for p in output.prompt_logprobs]
        return chunk

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _entry(self, token_id: int, logprob: float, top: dict[int, float] | None) -> TokenLogprob:
        return TokenLogprob(self._token(token_id), logprob, {self._token(t): lp for t, lp in (top or {}).items()})

    @staticmethod
    def placement(engine: EngineConfig, num_cpus_per_replica: float) -> dict:
        """Serve options for where a replica runs: for a tensor-parallel engine, a placement group with
        the replica (rank 0) in bundle 0 and one bundle per worker; empty for one rank."""
        if engine.tensor_parallel_size == 1:
            return {}
        gpus = {"GPU": engine.num_gpus_per_worker} if engine.num_gpus_per_worker else {}
        worker = {"CPU": engine.num_cpus_per_worker, **gpus}
        return {"placement_group_bundles": [{"CPU": num_cpus_per_replica, **gpus}]
                + [worker] * (engine.tensor_parallel_size - 1),
                "placement_group_strategy": engine.placement_strategy}

    def check_health(self) -> None:
        """Serve calls this periodically; a dead engine loop marks the replica unhealthy."""
        self.engine.check_health()

    def replica_state(self) -> dict:
        """For operators and tests: each tensor-parallel rank's node, pid, weight bytes and load peak
        (none for one rank), and the KV cache's free and total blocks."""
        engine = self.engine.engine
        infos = engine.runner.rank_infos() if hasattr(engine.runner, "rank_infos") else []
        return {"ranks": [dataclasses.asdict(info) for info in infos],
                "num_free_blocks": engine.kv_cache.num_free_blocks, "num_blocks": engine.kv_cache.pool.num_blocks}

    def record_routing_stats(self) -> dict:
        """Serve polls this for its request router: what the prefix cache holds, and the load."""
        return dataclasses.asdict(self.engine.engine.routing_stats())

    async def __del__(self):
        await self.engine.shutdown()
