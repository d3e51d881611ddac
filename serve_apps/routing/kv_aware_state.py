"""The KV-cache-aware router's state and decision, as a plain class (no Ray in here).

Each replica is known by the block hashes its prefix cache holds (the engine's own chained
hashes, reported through Serve's routing stats) and its load (requests in flight). A request is
known by the hashes of its prompt's full blocks. The rule:

1. Replicas whose load exceeds the least loaded one's by more than `max_imbalance` are out.
2. Of the rest, the one holding the longest cached prefix of the prompt wins (ties: less load).
3. If none holds even the first block, power of two choices: the less loaded of two at random.

Between stats reports the state assumes a replica will cache what it was sent (it will, once
the prefill runs), so a burst sharing a new prefix follows its first request.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from serve_apps.engine.block_hash import BlockHash


@dataclass
class Decision:
    ranked: list[str]  # replica ids, most preferred first
    matched_blocks: int  # of the winner
    reason: str  # "prefix", "least_loaded" (imbalance), "pow2" (no prefix anywhere)


@dataclass
class _Replica:
    cached: set[BlockHash] = field(default_factory=set)


class KVAwareRouterState:
    def __init__(self, max_imbalance: int = 8, seed: int | None = None):
        if max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance}")
        self.max_imbalance = max_imbalance
        self._replicas: dict[str, _Replica] = {}
        self._rng = random.Random(seed)

    # -- what replicas report -------------------------------------------------------------------
    def report(self, replica_id: str, cached: Iterable[BlockHash]) -> None:
        """A replica's routing stats: the block hashes its cache holds now (replaces the old set)."""
        self._replicas.setdefault(replica_id, _Replica()).cached = set(cached)

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def record_routed(self, replica_id: str, hashes: Sequence[BlockHash]) -> None:
        """The request went there: its prefix will be cached there after its prefill."""
        self._replicas.setdefault(replica_id, _Replica()).cached.update(hashes)

    # -- the decision -----------------------------------------------------------------------------
    def matched_blocks(self, replica_id: str, hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of the prompt the replica holds (chained hashes: a hit implies its prefix)."""
        cached = self._replicas.get(replica_id, _Replica()).cached
        count = 0
        for block_hash in hashes:
            if block_hash not in cached:
                break
            count += 1
        return count

    def choose(self, hashes: Sequence[BlockHash], loads: dict[str, int]) -> Decision:
        """Rank the candidate replicas (`loads`: replica id -> requests in flight) for a prompt."""
        if not loads:
            raise ValueError("no candidate replicas")
        least = min(loads.values())
        balanced = [r for r in loads if loads[r] - least <= self.max_imbalance]
        matches = {r: self.matched_blocks(r, hashes) for r in balanced}
        best = max(balanced, key=lambda r: (matches[r], -loads[r]))
        if matches[best] > 0:
            reason = "prefix"
        elif len(balanced) < len(loads):
            best, reason = min(loads, key=loads.get), "least_loaded"
        else:
            pair = self._rng.sample(list(loads), min(2, len(loads)))
            best, reason = min(pair, key=loads.get), "pow2"
        rest = sorted((r for r in loads if r != best), key=lambda r: (loads[r], -matches.get(r, 0)))
        return Decision([best, *rest], matches.get(best, 0), reason)
