"""Paged attention against plain causal attention over contiguous keys and values, and the
C++ CPU decode kernel against the torch reference."""
import pytest
import torch
import torch.nn.functional as F

from kernels.cpu_ops import native_ops
from kernels.paged_attention import (
    decode_attention_reference,
    kv_cache_shapes,
    paged_attention,
    paged_attention_reference,
    write_kv_cache,
)


@pytest.mark.parametrize("window", [None, 5])
def test_ragged_batch_matches_dense_attention(window):
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 4, 2, 8, 4, 64
    k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, kv_heads, dim)
    k_cache, v_cache = torch.zeros(k_shape), torch.zeros(v_shape)
    free = torch.randperm(num_blocks).tolist()  # scattered blocks, as after much traffic
    sequences = [(9, 9), (13, 1), (6, 4), (20, 1)]  # (context length, new tokens this step)
    tables, queries, expected = [], [], []
    for context, new in sequences:
        table = [free.pop() for _ in range(-(-context // block_size))]
        tables.append(table)
        keys, values = torch.randn(context, kv_heads, dim), torch.randn(context, kv_heads, dim)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(context)])
        write_kv_cache(keys, values, k_cache, v_cache, slots)
        query = torch.randn(new, heads, dim)
        queries.append(query)
        keys_at, queries_at = torch.arange(context)[None, :], torch.arange(context - new, context)[:, None]
        mask = (keys_at <= queries_at) & ((keys_at > queries_at - window) if window else True)
        dense = F.scaled_dot_product_attention(
            query.transpose(0, 1), keys.repeat_interleave(2, 1).transpose(0, 1),
            values.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask, scale=dim**-0.5)
        expected.append(dense.transpose(0, 1))
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    for attend in (paged_attention, paged_attention_reference):  # the native kernel and the reference
        out = attend(torch.cat(queries), k_cache, v_cache, block_tables,
                     [n for _, n in sequences], [c for c, _ in sequences], dim**-0.5, window=window)
        torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def _scattered_cache(num_seqs, kv_heads, dim, block_size, lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    width = -(-max(lengths) // block_size)
    num_blocks = num_seqs * width + 3
    k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, kv_heads, dim)
    k_cache, v_cache = torch.randn(k_shape, generator=generator), torch.randn(v_shape, generator=generator)
    tables = torch.randperm(num_blocks, generator=generator)[: num_seqs * width].view(num_seqs, width)
    return k_cache, v_cache, tables


@pytest.mark.parametrize("num_seqs, heads, kv_heads, dim", [
    (1, 9, 3, 64),    # batch 1: split across KV heads to use both cores
    (3, 4, 4, 8),     # no grouping, a tiny head
    (16, 9, 3, 64),   # SmolLM2's shape, whole sequences per work item
    (9, 8, 1, 128),   # multi-query
    (4, 4, 1, 256),   # Gemma 3 270M's shape
    (5, 16, 1, 64),   # 16 query heads per KV head: past the specialized kernels, the general one
])
def test_native_decode_kernel_matches_reference(num_seqs, heads, kv_heads, dim):
    ops = native_ops()
    assert ops is not None, "the C++ CPU kernels must build here (gcc and ninja are dependencies)"
    block_size = 16
    lengths = [1, 16, 17, 33, 200, 5, 64, 129, 48, 2, 31, 90, 250, 16, 7, 100][:num_seqs]
    k_cache, v_cache, tables = _scattered_cache(num_seqs, kv_heads, dim, block_size, lengths, seed=num_seqs)
    query = torch.randn(num_seqs, heads, dim)
    lens = torch.tensor(lengths)
    expected = decode_attention_reference(query, k_cache, v_cache, tables, lens, dim**-0.5)
    out = ops.paged_attention(query, k_cache, v_cache, tables, torch.arange(num_seqs), lens, dim**-0.5, 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_native_decode_kernel_rejects_other_dtypes():
    ops = native_ops()
    k_cache, v_cache, tables = _scattered_cache(2, 2, 8, 4, [3, 4], seed=0)
    with pytest.raises(RuntimeError, match="float32"):
        ops.paged_attention(torch.randn(2, 2, 8).bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables,
                            torch.arange(2), torch.tensor([3, 4]), 0.3, 0)


@pytest.mark.parametrize("heads, kv_heads, dim, block_size", [
    (9, 3, 64, 16),   # SmolLM2: tiles of 2 rows x 3 heads (AVX2), 4 x 3 (AVX-512)
    (4, 4, 64, 16),   # one head per KV head: tiles of several rows
    (8, 1, 128, 16),  # 8 heads per KV head: more than a tile holds on AVX2
    (4, 2, 8, 4),     # the general kernel
])
@pytest.mark.parametrize("window", [None, 20])
def test_native_kernel_takes_prefill_chunks_and_decodes_in_one_call(heads, kv_heads, dim, block_size, window):
    """Chunks that start the context, chunks after cached tokens, and decodes, mixed in one batch;
    with a sliding window too (windows starting mid-block, and longer than some contexts)."""
    sequences = [(130, 130), (45, 1), (70, 23), (1, 1), (16, 16), (200, 1), (33, 17)]  # (context, new tokens)
    lengths = [c for c, _ in sequences]
    k_cache, v_cache, tables = _scattered_cache(len(sequences), kv_heads, dim, block_size, lengths, seed=dim)
    query = torch.randn(sum(n for _, n in sequences), heads, dim)
    query_lens = [n for _, n in sequences]
    expected = paged_attention_reference(query, k_cache, v_cache, tables, query_lens, lengths, dim**-0.5,
                                         window=window)
    out = paged_attention(query, k_cache, v_cache, tables, query_lens, lengths, dim**-0.5, window=window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_native_kv_write_equals_the_indexed_write_from_strided_views():
    heads, kv_heads, dim, block_size, num_blocks = 9, 3, 64, 16, 12
    qkv = torch.randn(21, (heads + 2 * kv_heads) * dim)
    _, key, value = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    key, value = key.view(-1, kv_heads, dim), value.view(-1, kv_heads, dim)  # rows strided, as in the model
    slots = torch.randperm(num_blocks * block_size)[:21]
    caches = [[torch.zeros(shape) for shape in kv_cache_shapes(num_blocks, block_size, kv_heads, dim)]
              for _ in range(2)]
    write_kv_cache(key, value, *caches[0], slots)
    blocks, offsets = slots // block_size, slots % block_size
    caches[1][0][blocks, :, :, offsets] = key
    caches[1][1][blocks, :, offsets] = value
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
