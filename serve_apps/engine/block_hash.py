"""Pure block hashing for automatic prefix caching.

A full block of KV cache is named by a hash chained over (parent block's hash, the block's
token ids): equal hashes mean equal whole prefixes, not just equal blocks, so a hit on block i
implies hits on blocks 0..i-1. The hashes are stable across processes (no Python `hash()` of
str/bytes), so replicas can report them to the request router, which uses the same function.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = int

ROOT_HASH: BlockHash = int.from_bytes(hashlib.blake2b(b"rayfoundry-kv-root", digest_size=8).digest(), "little")


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(parent.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Append to `hashes` (those of the leading full blocks of `token_ids`, perhaps none) the chained
    hashes of the full blocks after them; returns `hashes`. As a sequence grows, each block is
    hashed once."""
    parent = hashes[-1] if hashes else ROOT_HASH
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def hash_full_blocks(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids` (a partial last block has none)."""
    return extend_block_hashes([], token_ids, block_size)
