"""One engine per Serve replica: a request's token ids in, a stream of Chunks out.

The ingress tokenizes (serve_apps/prompts.py) so the router can hash prompts; the replica
reports the block hashes its prefix cache holds as Serve routing stats. A stream that its
caller abandons (the client went away) is cancelled by Serve, and the engine aborts the
request, freeing its KV blocks.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from serve_apps.engine.async_engine import AsyncLLMEngine
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine, RequestOutput
from serve_apps.engine.metrics import RayMetricsSink
from serve_apps.engine.sampling_params import SamplingParams
from serve_apps.openai_protocol import Chunk, TokenLogprob


class LLMServer:
    """The deployment's class; serve_apps.app wraps it with serve.deployment and its options."""

    def __init__(self, model_id: str, model: str, engine_config: EngineConfig):
        """model_id: the name clients use (metrics carry it); model: what to load (cluster.store)."""
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        sink = RayMetricsSink(model_id, self.replica_id)
        self.engine = AsyncLLMEngine(LLMEngine(model, engine_config, metrics_sink=sink))
        self.tokenizer = self.engine.engine.tokenizer
        self.max_model_len = self.engine.engine.max_model_len

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        return max(1, self.max_model_len - num_prompt_tokens)

    async def generate(self, request, choice: int, token_ids: list[int], echo: bool = False) -> AsyncIterator[Chunk]:
        """Stream one choice of an OpenAI request (CompletionRequest or ChatCompletionRequest).
        Positional on purpose: request routers read a request's arguments (ours the token ids,
        Ray's prefix router the body's prompt or messages)."""
        logprobs = _requested_logprobs(request)
        params = request.sampling_params(choice, self.default_max_tokens(len(token_ids)), logprobs,
                                         prompt_logprobs=logprobs if echo and logprobs is not None else None)
        first = True
        async for output in self.engine.generate(token_ids, params):
            yield self._chunk(output, token_ids, params, first, echo)
            first = False

    def _chunk(self, output: RequestOutput, prompt_ids: list[int], params: SamplingParams, first: bool,
               echo: bool) -> Chunk:
        chunk = Chunk(output.new_text, len(prompt_ids), len(output.token_ids), output.finish_reason,
                      replica=self.replica_id, num_cached_tokens=output.num_cached_tokens)
        if params.logprobs is not None:
            new = output.logprobs[len(output.logprobs) - len(output.new_token_ids):]
            chunk.logprobs = [self._entry(s.token_id, s.logprob, s.top_logprobs) for s in new]
        if first and echo:
            chunk.prompt_text = self.tokenizer.decode(prompt_ids)
            if output.prompt_logprobs is not None:
                chunk.prompt_logprobs = [TokenLogprob(self._token(prompt_ids[0]), None)] + [
                    self._entry(p.token_id, p.logprob, p.top_logprobs) for p in output.prompt_logprobs]
        return chunk

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _entry(self, token_id: int, logprob: float, top: dict[int, float] | None) -> TokenLogprob:
        return TokenLogprob(self._token(token_id), logprob, {self._token(t): lp for t, lp in (top or {}).items()})

    def check_health(self) -> None:
        """Serve calls this periodically; a dead engine loop marks the replica unhealthy."""
        self.engine.check_health()

    def record_routing_stats(self) -> dict:
        """Serve polls this for its request router: what the prefix cache holds, and the load."""
        engine = self.engine.engine
        return {"kv_block_hashes": engine.kv_cache.pool.cached_hashes(),
                "num_requests": len(engine.scheduler.running) + len(engine.scheduler.waiting),
                "num_free_blocks": engine.kv_cache.num_free_blocks}

    async def __del__(self):
        await self.engine.shutdown()


def _requested_logprobs(request) -> int | None:
    """Completions: `logprobs: n`. Chat: `logprobs: true` plus `top_logprobs: n`."""
    if isinstance(request.logprobs, bool):
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs
