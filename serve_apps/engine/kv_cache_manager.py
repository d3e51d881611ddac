"""Per-request block tables over the block pool, with automatic prefix caching.

The scheduler sees three verbs: `find_cached_prefix` (how many prompt tokens are already in
the cache), `allocate` (room for the tokens it is about to compute, or False) and `free`.
After a step, `cache_full_blocks` registers the blocks that step filled so others can share them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from serve_apps.engine.block_hash import ROOT_HASH, BlockHash, hash_block_tokens
from serve_apps.engine.block_pool import Block, BlockPool


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


@dataclass
class _Table:
    blocks: list[Block] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # of the leading full, registered blocks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._tables: dict[str, _Table] = {}

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: Sequence[int]) -> list[Block]:
        """The longest run of cached full blocks that starts `token_ids`.

        The last prompt token is never taken from the cache: its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], ROOT_HASH
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(token_ids[start : start + self.block_size])
            parent = hash_block_tokens(parent, chunk)
            block = self.pool.lookup(parent, chunk)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Counted by the caller once a lookup is used, not each time a blocked request retries."""
        self.stats.queried_tokens += num_queried_tokens
        self.stats.hit_tokens += num_hit_tokens

    def allocate(self, request_id: str, num_tokens: int, cached_prefix: Sequence[Block] = ()) -> bool:
        """Make the request's table cover `num_tokens` tokens, sharing `cached_prefix` first.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        table = self._tables.setdefault(request_id, _Table())
        num_new = self.num_blocks_for(num_tokens) - len(table.blocks) - len(cached_prefix)
        free_hits = sum(1 for b in cached_prefix if b.ref_count == 0)  # acquiring them uses free blocks
        if num_new + free_hits > self.pool.num_free:
            if not table.blocks:
                del self._tables[request_id]
            return False
        for block in cached_prefix:
            self.pool.acquire(block)
            table.blocks.append(block)
            table.hashes.append(block.hash)
        table.blocks.extend(self.pool.allocate() for _ in range(max(0, num_new)))
        return True

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table.blocks))
        parent = table.hashes[-1] if table.hashes else ROOT_HASH
        for index in range(len(table.hashes), num_full):
            chunk = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            parent = hash_block_tokens(parent, chunk)
            self.pool.register(table.blocks[index], parent, chunk)
            table.hashes.append(parent)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.id for b in self._tables[request_id].blocks]

    def free(self, request_id: str) -> None:
        """Release the request's blocks, last first, so its unshared tail is evicted first."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            for block in reversed(table.blocks):
                self.pool.release(block)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1 - self.pool.num_free / self.pool.num_blocks
