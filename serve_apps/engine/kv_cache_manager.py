"""Per-request block tables over the block pool, with automatic prefix caching.

The scheduler sees three verbs: `find_cached_prefix` (the prompt's blocks already in the cache, as
a small opaque result), `allocate` (room for the tokens it is about to compute, or False) and `free`.
After a step, `cache_full_blocks` registers the blocks that step filled so others can share them.
A request's block hashes are computed once, as its tokens arrive (Request.block_hashes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from serve_apps.engine.block_hash import BlockHash, extend_block_hashes
from serve_apps.engine.block_pool import Block, BlockPool
from serve_apps.engine.request import Request


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


@dataclass(frozen=True)
class CachedPrefix:
    """The leading blocks of a prompt found in the cache: `allocate` takes them; the scheduler reads
    only `num_tokens`."""

    blocks: tuple[Block, ...] = ()
    num_tokens: int = 0


NO_PREFIX = CachedPrefix()


@dataclass
class _Table:
    blocks: list[Block] = field(default_factory=list)
    num_registered: int = 0  # leading full blocks registered in the prefix cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._tables: dict[str, _Table] = {}

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        return extend_block_hashes(request.block_hashes, request.token_ids, self.block_size)

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        return tuple(request.token_ids[index * self.block_size : (index + 1) * self.block_size])

    def find_cached_prefix(self, request: Request) -> CachedPrefix:
        """The longest run of cached full blocks that starts the request's tokens.

        The last token is never taken from the cache: its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return NO_PREFIX
        hits = []
        eligible = (len(request.token_ids) - 1) // self.block_size
        for index, block_hash in enumerate(self._block_hashes(request)[:eligible]):
            block = self.pool.lookup(block_hash, self._block_tokens(request, index))
            if block is None:
                break
            hits.append(block)
        return CachedPrefix(tuple(hits), len(hits) * self.block_size)

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Counted by the caller once a lookup is used, not each time a blocked request retries."""
        self.stats.queried_tokens += num_queried_tokens
        self.stats.hit_tokens += num_hit_tokens

    def allocate(self, request_id: str, num_tokens: int, prefix: CachedPrefix = NO_PREFIX) -> bool:
        """Make the request's table cover `num_tokens` tokens, sharing `prefix`'s blocks first.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        table = self._tables.setdefault(request_id, _Table())
        num_new = self.num_blocks_for(num_tokens) - len(table.blocks) - len(prefix.blocks)
        free_hits = sum(1 for b in prefix.blocks if b.ref_count == 0)  # acquiring them uses free blocks
        if num_new + free_hits > self.pool.num_free:
            if not table.blocks:
                del self._tables[request_id]
            return False
        for block in prefix.blocks:
            self.pool.acquire(block)
            table.blocks.append(block)
        table.num_registered += len(prefix.blocks)
        table.blocks.extend(self.pool.allocate() for _ in range(max(0, num_new)))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request.request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(table.blocks))
        hashes = self._block_hashes(request)
        for index in range(table.num_registered, num_full):
            self.pool.register(table.blocks[index], hashes[index], self._block_tokens(request, index))
        table.num_registered = max(table.num_registered, num_full)

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
