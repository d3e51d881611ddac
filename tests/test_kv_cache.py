"""Paged KV cache: pure block hashing, the pool's refcounts and LRU, prefix sharing, no leaks."""
import random

import pytest

from serve_apps.engine.block_hash import ROOT_HASH, hash_block_tokens, hash_full_blocks
from serve_apps.engine.block_pool import BlockPool
from serve_apps.engine.kv_cache_manager import KVCacheManager
from serve_apps.engine.request import Request
from serve_apps.engine.sampling_params import SamplingParams


def computed(request_id: str, token_ids: list[int]) -> Request:
    """A request whose tokens have all been computed."""
    request = Request(request_id, token_ids, SamplingParams())
    request.num_computed_tokens = len(token_ids)
    return request


def test_block_hashes_chain_over_the_whole_prefix():
    a = hash_full_blocks([1, 2, 3, 4, 5, 6, 7], block_size=2)
    assert len(a) == 3  # the partial last block has no hash
    assert a[0] == hash_block_tokens(ROOT_HASH, [1, 2])
    assert a[1] == hash_block_tokens(a[0], [3, 4])
    b = hash_full_blocks([9, 9, 3, 4], block_size=2)
    assert b[1] != a[1]  # same tokens, different prefix


def test_pool_evicts_least_recently_freed_and_keeps_cached_contents():
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    assert pool.num_free == 0
    for i, block in enumerate(blocks):
        pool.register(block, 100 + i, (i,))
    for block in (blocks[2], blocks[0], blocks[1]):
        pool.release(block)
    assert pool.lookup(100, (0,)) is blocks[0]  # freed but still cached
    assert pool.lookup(100, (7,)) is None  # a hash match with other tokens is a miss
    pool.acquire(blocks[0])  # a hit takes it off the free queue
    assert pool.num_free == 2
    assert pool.allocate() is blocks[2]  # freed first, evicted first
    assert pool.lookup(102, (2,)) is None
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(blocks[1])  # already free


def test_shared_prefix_is_reused_and_counted():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    a = computed("a", list(range(10)))
    assert manager.find_cached_prefix(a).num_tokens == 0
    assert manager.allocate("a", 10)
    manager.cache_full_blocks(a)
    b = computed("b", list(range(9)) + [99])
    prefix = manager.find_cached_prefix(b)
    assert prefix.num_tokens == 8 and len(prefix.blocks) == 2
    assert manager.allocate("b", 10, prefix)
    assert manager.block_ids("b")[:2] == manager.block_ids("a")[:2]
    assert manager.block_ids("b")[2] != manager.block_ids("a")[2]
    assert manager.num_free_blocks == 8 - 4
    # an exact repeat still computes its last token
    assert manager.find_cached_prefix(computed("c", list(range(8)))).num_tokens == 4


def test_a_request_hashes_each_block_once():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    request = computed("a", list(range(10)))
    manager.find_cached_prefix(request)
    hashes = list(request.block_hashes)
    assert hashes == hash_full_blocks(request.token_ids, 4)
    request.block_hashes[0] = -1  # a retried lookup must reuse what was hashed, not hash again
    manager.find_cached_prefix(request)
    assert request.block_hashes == [-1, *hashes[1:]]
    request.token_ids += [10, 11]  # two more tokens fill the third block: only it is hashed
    manager.find_cached_prefix(request)
    assert request.block_hashes[:2] == [-1, hashes[1]] and len(request.block_hashes) == 3


def test_allocation_failure_changes_nothing():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    assert manager.allocate("a", 8)
    assert not manager.allocate("b", 8)
    assert manager.num_free_blocks == 1
    manager.free("b")  # nothing held: a no-op
    manager.free("a")
    assert manager.num_free_blocks == 3


def test_random_traffic_with_aborts_leaks_nothing():
    rng = random.Random(0)
    manager = KVCacheManager(num_blocks=64, block_size=4)
    live: set[str] = set()
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(4)]
    for step in range(3000):
        if live and rng.random() < 0.3:  # finish or abort a request
            done = rng.choice(sorted(live))
            live.remove(done)
            manager.free(done)
            continue
        rid = f"r{step}"
        request = computed(rid, rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))])
        if manager.allocate(rid, len(request.token_ids), manager.find_cached_prefix(request)):
            manager.cache_full_blocks(request)
            live.add(rid)
    for rid in list(live):
        manager.free(rid)
    assert manager.num_free_blocks == 64
    assert all(block.ref_count == 0 for block in manager.pool.blocks)
    assert sum(b.hash is not None for b in manager.pool.blocks) > 0
