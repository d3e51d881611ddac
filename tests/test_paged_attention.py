"""Paged attention against plain causal attention over contiguous keys and values, and the
C++ CPU decode kernel against the torch reference."""
import pytest
import torch
import torch.nn.functional as F

from kernels.cpu_ops import native_ops
from kernels.paged_attention import decode_attention_reference, kv_cache_shapes, paged_attention, write_kv_cache


def test_ragged_batch_matches_dense_attention():
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
        mask = torch.arange(context)[None, :] <= torch.arange(context - new, context)[:, None]
        dense = F.scaled_dot_product_attention(
            query.transpose(0, 1), keys.repeat_interleave(2, 1).transpose(0, 1),
            values.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask, scale=dim**-0.5)
        expected.append(dense.transpose(0, 1))
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    out = paged_attention(torch.cat(queries), k_cache, v_cache, block_tables,
                          [n for _, n in sequences], [c for c, _ in sequences], dim**-0.5)
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
    out = ops.decode_attention(query, k_cache, v_cache, tables, lens, dim**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_native_decode_kernel_rejects_other_dtypes():
    ops = native_ops()
    k_cache, v_cache, tables = _scattered_cache(2, 2, 8, 4, [3, 4], seed=0)
    with pytest.raises(RuntimeError, match="float32"):
        ops.decode_attention(torch.randn(2, 2, 8).bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables,
                             torch.tensor([3, 4]), 0.3)
