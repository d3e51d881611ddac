"""The KV-cache-aware router's state and decision, as a plain class (no Ray in here).

Each replica is known by the block hashes its prefix cache holds (the engine's own chained
hashes, reported through Serve's routing stats) and its load (requests in flight). A request is
known by the hashes of its prompt's full blocks. The rule:

1. Replicas whose load exceeds the least loaded one's by more than `max_imbalance` are out.
2. Of the rest, the one holding the longest cached prefix of the prompt wins (ties: less load).
3. If none holds even the first block, the prompt starts a new prefix: the replica caching the
   fewest blocks takes it (ties: less load), so prefixes spread over the replicas' caches rather
   than crowd one and evict each other. If a replica that does hold it was left out in 1, the
   least loaded replica takes it.
4. A prompt shorter than one block has nothing to share: power of two choices, the less loaded of
   two at random.

Between stats reports the state assumes a replica will cache what it was sent (it will, once
the prefill runs), so a burst sharing a new prefix follows its first request. Those assumed
blocks are kept apart from the reported ones for `routed_ttl_s`: a report can be older than the
routing (taken before the prefill ran), and must not make the router forget where it just sent
a prefix.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from serve_apps.engine.block_hash import BlockHash


# A replica batches its requests, so a few more in flight cost it little, while sending a request
# away from its cached prefix costs a whole prefill (and a second copy of the prefix): tolerate a
# batch's worth of imbalance before spilling.
DEFAULT_MAX_IMBALANCE = 16
# Serve drops a replica from a routing attempt when its queue-length probe misses a deadline (0.1 s
# at first, doubling each retry), which a replica whose CPU is busy can do while far from full. A
# request whose prefix a replica caches waits this long for that replica before it may spill.
DEFAULT_PREFIX_PATIENCE_S = 1.0


@dataclass
class Decision:
    ranked: list[str]  # replica ids, most preferred first
    matched_blocks: int  # of the winner
    reason: str  # "prefix", "least_loaded" (imbalance), "new_prefix", "pow2" (no full block)

    def tiers(self, waited_s: float, patience_s: float = DEFAULT_PREFIX_PATIENCE_S) -> list[list[str]]:
        """The ranking as Serve's routing attempts take it: tier by tier. A cached prefix's replica
        stands alone until the request has waited `patience_s`."""
        if self.reason == "prefix" and waited_s < patience_s:
            return [self.ranked[:1]]
        return [[replica] for replica in self.ranked]


@dataclass
class _Replica:
    cached: set[BlockHash] = field(default_factory=set)  # as last reported
    routed: dict[BlockHash, float] = field(default_factory=dict)  # sent there since: hash -> expiry

    def holds(self, block_hash: BlockHash, now: float) -> bool:
        return block_hash in self.cached or self.routed.get(block_hash, -1.0) > now

    def num_blocks(self, now: float) -> int:
        return len(self.cached) + sum(expiry > now for expiry in self.routed.values())


class KVAwareRouterState:
    def __init__(self, max_imbalance: int = DEFAULT_MAX_IMBALANCE, seed: int | None = None, routed_ttl_s: float = 30.0):
        if max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance}")
        if routed_ttl_s <= 0:
            raise ValueError(f"routed_ttl_s must be > 0, got {routed_ttl_s}")
        self.max_imbalance = max_imbalance
        self.routed_ttl_s = routed_ttl_s
        self._replicas: dict[str, _Replica] = {}
        self._rng = random.Random(seed)

    # -- what replicas report -------------------------------------------------------------------
    def report(self, replica_id: str, cached: Iterable[BlockHash], now: float | None = None) -> None:
        """A replica's routing stats: the block hashes its cache holds (replaces the old report)."""
        replica = self._replicas.setdefault(replica_id, _Replica())
        replica.cached = set(cached)
        now = time.monotonic() if now is None else now
        replica.routed = {h: expiry for h, expiry in replica.routed.items() if expiry > now and h not in replica.cached}

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def record_routed(self, replica_id: str, hashes: Sequence[BlockHash], now: float | None = None) -> None:
        """The request went there: its prefix will be cached there after its prefill."""
        expiry = (time.monotonic() if now is None else now) + self.routed_ttl_s
        self._replicas.setdefault(replica_id, _Replica()).routed.update(dict.fromkeys(hashes, expiry))

    # -- the decision -----------------------------------------------------------------------------
    def matched_blocks(self, replica_id: str, hashes: Sequence[BlockHash], now: float | None = None) -> int:
        """Leading blocks of the prompt the replica holds (chained hashes: a hit implies its prefix)."""
        replica = self._replicas.get(replica_id, _Replica())
        now = time.monotonic() if now is None else now
        count = 0
        for block_hash in hashes:
            if not replica.holds(block_hash, now):
                break
            count += 1
        return count

    def choose(self, hashes: Sequence[BlockHash], loads: dict[str, int], now: float | None = None) -> Decision:
        """Rank the candidate replicas (`loads`: replica id -> requests in flight) for a prompt."""
        if not loads:
            raise ValueError("no candidate replicas")
        now = time.monotonic() if now is None else now
        least = min(loads.values())
        balanced = [r for r in loads if loads[r] - least <= self.max_imbalance]
        matches = {r: self.matched_blocks(r, hashes, now) for r in balanced}
        best = max(balanced, key=lambda r: (matches[r], -loads[r]))
        if matches[best] > 0:
            reason = "prefix"
        elif len(balanced) < len(loads):
            best, reason = min(loads, key=loads.get), "least_loaded"
        elif hashes:
            best = min(balanced, key=lambda r: (self._replicas.get(r, _Replica()).num_blocks(now), loads[r]))
            reason = "new_prefix"
        else:
            pair = self._rng.sample(list(loads), min(2, len(loads)))
            best, reason = min(pair, key=loads.get), "pow2"
        rest = sorted((r for r in loads if r != best), key=lambda r: (loads[r], -matches.get(r, 0)))
        return Decision([best, *rest], matches.get(best, 0), reason)
