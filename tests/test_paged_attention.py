"""Paged attention against plain causal attention over contiguous keys and values."""
import torch
import torch.nn.functional as F

from kernels.paged_attention import paged_attention, write_kv_cache


def test_ragged_batch_matches_dense_attention():
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 4, 2, 8, 4, 64
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
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
