"""Ray Serve request routers for LLMServer deployments, selected by name in the app config.

- round_robin: each request to the next replica in turn, blind to load and caches.
- pow2: Serve's default, the less loaded of two random replicas.
- ray_prefix: Ray Serve LLM's PrefixCacheAffinityRouter (a character prefix tree of prompts),
  adapted to our calls and with two guards (see RayPrefixRouter).
- kv_aware: ours, the replica whose prefix cache holds the longest prefix of the prompt's blocks
  (the engine's own block hashes) unless load is too uneven (serve_apps/routing/kv_aware_state.py).

Routers run in the caller's process (the ingress replica); async code here never blocks. They read
a request's arguments by name, as the ingress passes them: LLMServer.generate(token_ids=...,
params=..., client_prompt=...).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter

# Ray Serve LLM's prefix router is importable without vLLM from here.
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster import metrics as names
from serve_apps.engine.block_hash import hash_full_blocks
from serve_apps.routing.kv_aware_state import DEFAULT_MAX_IMBALANCE, KVAwareRouterState

ROUTERS = {
    "round_robin": "serve_apps.routing.routers:RoundRobinRouter",
    "pow2": None,  # Serve's default
    "ray_prefix": "serve_apps.routing.routers:RayPrefixRouter",
    "kv_aware": "serve_apps.routing.routers:KVAwareRouter",
}


def prompt_token_ids(pending_request: PendingRequest | None) -> list[int]:
    """The prompt's token ids; none for calls that are not a generation (routing stats, health)."""
    return [] if pending_request is None else pending_request.kwargs.get("token_ids", [])


@dataclasses.dataclass(frozen=True)
class _ClientPrompt:
    prompt: str | list  # Ray's router reads `.prompt`: text, or chat messages (it joins their contents)


def as_ray_llm_request(pending_request: PendingRequest) -> PendingRequest:
    """The request as Ray Serve LLM makes it, for Ray's router: the client's prompt in an argument
    with `.prompt` (Ray Serve LLM passes the HTTP body; ours arrives by keyword, `client_prompt`).
    A call that is not a generation has an empty one."""
    client_prompt = pending_request.kwargs.get("client_prompt", "")
    return dataclasses.replace(pending_request, args=[_ClientPrompt(client_prompt)])


# FIFOMixin: a request's choices share one internal request id, so pending requests must be
# fulfilled oldest first, not matched by that id (which leaves one of them waiting forever).
class RoundRobinRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs):
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        start = next(self._turn) % len(ordered)
        return [[replica] for replica in ordered[start:] + ordered[:start]]


class RayPrefixRouter(FIFOMixin, PrefixCacheAffinityRouter):
    """PrefixCacheAffinityRouter as Ray ships it, routing by the text of the client's prompt: it is
    shown each request as Ray Serve LLM makes it (as_ray_llm_request). Also FIFO (as above), and
    never stuck on a prompt without text (token ids, or empty): it divides by the text's length, and
    the error leaves the request pending forever. Those go by power of two choices."""

    def _has_text(self, request: PendingRequest) -> bool:
        return bool(self._extract_text_from_request(request))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return await super().choose_replicas(candidate_replicas)
        request = as_ray_llm_request(pending_request)
        if not self._has_text(request):
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        return await super().choose_replicas(candidate_replicas, request)

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        request = as_ray_llm_request(pending_request)
        if self._has_text(request):
            super().on_request_routed(request, replica_id, result)


class KVAwareRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, block_size: int = 16, max_imbalance: int = DEFAULT_MAX_IMBALANCE):
        self.block_size = block_size
        self.state = KVAwareRouterState(max_imbalance)
        self._in_flight: Counter[str] = Counter()  # requests this router sent and not yet finished
        self._applied_stats: dict[str, dict] = {}  # replica -> the stats report last applied
        # The deployment is "LLMServer:<model id>" (serve_apps.app); metrics carry the model id.
        self._model = self._deployment_id.name.split(":", 1)[-1]
        self._metrics = {spec.name: names.ray_metric(spec) for spec in names.ROUTER_METRICS}

    def _refresh(self, replicas: list[RunningReplica]) -> None:
        """Apply each replica's latest routing stats, once per report."""
        for replica in replicas:
            stats = replica.routing_stats or {}
            key = replica.replica_id.unique_id
            if "kv_block_hashes" in stats and self._applied_stats.get(key) is not stats:
                self.state.report(key, stats["kv_block_hashes"])
                self._applied_stats[key] = stats

    def _prompt_hashes(self, pending_request: PendingRequest | None) -> list[int]:
        return hash_full_blocks(prompt_token_ids(pending_request), self.block_size)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # a full ranking: sleep before retrying
        self._refresh(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        decision = self.state.choose(self._prompt_hashes(pending_request),
                                     {rid: self._in_flight[rid] for rid in by_id})
        self._metrics[names.ROUTER_DECISIONS.name].inc(
            tags={"model": self._model, "reason": decision.reason, "replica": decision.ranked[0]})
        waited_s = time.time() - pending_request.created_at if pending_request is not None else 0.0
        return [[by_id[rid] for rid in tier] for tier in decision.tiers(waited_s)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        replica, hashes = replica_id.unique_id, self._prompt_hashes(pending_request)
        tags = {"model": self._model, "replica": replica}
        names.increment(self._metrics[names.ROUTER_MATCHED_TOKENS.name],
                        self.state.matched_blocks(replica, hashes) * self.block_size, tags)
        names.increment(self._metrics[names.ROUTER_PROMPT_TOKENS.name], len(prompt_token_ids(pending_request)), tags)
        self._in_flight[replica] += 1
        self.state.record_routed(replica, hashes)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self._in_flight[replica_id.unique_id] = max(0, self._in_flight[replica_id.unique_id] - 1)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.state.forget(replica_id.unique_id)
        self._in_flight.pop(replica_id.unique_id, None)
        self._applied_stats.pop(replica_id.unique_id, None)
