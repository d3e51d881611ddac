"""The block pool: every KV block's reference count, the free queue and the prefix-cache map."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from serve_apps.engine.block_hash import BlockHash


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0
    hash: BlockHash | None = None  # set once the block is full and registered in the cache
    token_ids: tuple[int, ...] = ()  # kept to re-check a hit: a hash match alone is not proof


class BlockPool:
    """Owns all blocks. A block with no references sits in the free queue but keeps its cached
    contents until it is handed out again, so a later request can still hit it.

    The free queue is an OrderedDict of block ids: allocation takes the block freed longest ago
    (LRU eviction), and a cache hit on a free block removes it from the middle in O(1).
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def cached_hashes(self) -> list[BlockHash]:
        """Hashes of every block a prefix lookup can hit now (one C-level copy: safe to call from
        another thread while the engine steps)."""
        return list(self._cached)

    def allocate(self) -> Block:
        """A fresh block with one reference, evicting the least recently freed cached block."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) is block:
                del self._cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def lookup(self, block_hash: BlockHash, token_ids: tuple[int, ...]) -> Block | None:
        block = self._cached.get(block_hash)
        return block if block is not None and block.token_ids == token_ids else None

    def acquire(self, block: Block) -> None:
        """Add a reference to a cached block, taking it off the free queue if it was there."""
        if block.ref_count == 0:
            del self._free[block.id]
        block.ref_count += 1

    def release(self, block: Block) -> None:
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block.id} released more often than acquired")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block.id] = None  # most recently freed: evicted last

    def register(self, block: Block, block_hash: BlockHash, token_ids: tuple[int, ...]) -> None:
        """Make a full block findable by its hash (the first block with a hash keeps it)."""
        block.hash, block.token_ids = block_hash, token_ids
        self._cached.setdefault(block_hash, block)
