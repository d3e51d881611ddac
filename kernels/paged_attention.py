"""Attention over a paged KV cache: the torch reference, with the C++ kernel (kernels/csrc) on
CPU and the Triton kernel (kernels/triton_paged_attention.py) on CUDA, both over a whole ragged
batch in one call.

Layout (kv_cache_shapes): a sequence's tokens live in the blocks its block table lists, in
order; within a block each KV head's keys are stored transposed, k_cache [num_blocks,
num_kv_heads, head_dim, block_size], and its values row by row, v_cache [num_blocks,
num_kv_heads, block_size, head_dim]. A kernel then scores a whole block of keys with
head_dim multiply-adds over block_size-wide vectors, and sums values over contiguous rows,
with no horizontal reductions (vLLM's paged attention lays its keys out in the same spirit).
A batch is ragged: sequence i
contributes query_lens[i] consecutive rows of `query` (a prefill chunk, or 1 for a decode) and
attends causally to its first context_lens[i] cached tokens, its new ones included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu_ops import native_ops
from kernels.fused_layers import rotary
from kernels.ragged_batch import token_layout


def kv_cache_shapes(num_blocks: int, block_size: int, num_kv_heads: int,
                    head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one layer's (k_cache, v_cache)."""
    return (num_blocks, num_kv_heads, head_dim, block_size), (num_blocks, num_kv_heads, block_size, head_dim)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store new keys/values [T, kv_heads, head_dim] at flat slots (block * block_size + offset)."""
    if key.device.type == "cpu" and k_cache.dtype == key.dtype == torch.float32 and (ops := native_ops()):
        ops.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    blocks, offsets = slot_mapping // v_cache.shape[2], slot_mapping % v_cache.shape[2]
    k_cache[blocks, :, :, offsets] = key
    v_cache[blocks, :, offsets] = value


def rotary_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """From a fused qkv projection [T, (Hq + 2 Hkv) * D]: rotary embedding on queries and keys, keys and
    values stored at their cache slots; returns the queries [T, Hq, D]. One native call on CPU."""
    if qkv.device.type == "cpu" and qkv.dtype == k_cache.dtype == torch.float32 and qkv.dim() == 2 \
            and qkv.stride(-1) == 1 and not (torch.is_grad_enabled() and qkv.requires_grad) \
            and (ops := native_ops()) is not None:
        return ops.rotary_and_cache(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
    kv_heads, dim = k_cache.shape[1], k_cache.shape[2]
    q, k, v = qkv.split([num_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = rotary(q.view(-1, num_heads, dim), cos, sin)
    k = rotary(k.view(-1, kv_heads, dim), cos, sin)
    write_kv_cache(k, v.view(-1, kv_heads, dim), k_cache, v_cache, slot_mapping)
    return q


def _gather_keys(k_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> keys [B, kv_heads, max_blocks * block_size, head_dim]."""
    batch, width = block_table.shape
    _, heads, dim, block_size = k_cache.shape
    # index_select on the block axis: about twice as fast on CPU as advanced indexing
    gathered = k_cache.index_select(0, block_table.flatten()).view(batch, width, heads, dim, block_size)
    return gathered.permute(0, 2, 1, 4, 3).reshape(batch, heads, width * block_size, dim)


def _gather_values(v_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> values [B, kv_heads, max_blocks * block_size, head_dim]."""
    batch, width = block_table.shape
    _, heads, block_size, dim = v_cache.shape
    gathered = v_cache.index_select(0, block_table.flatten()).view(batch, width, heads, block_size, dim)
    return gathered.transpose(1, 2).reshape(batch, heads, width * block_size, dim)


def _visible(key_positions: torch.Tensor, query_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal mask [queries, keys], and within the last `window` positions when there is a window."""
    mask = key_positions[None, :] <= query_positions[:, None]
    if window:
        mask &= key_positions[None, :] > query_positions[:, None] - window
    return mask


def decode_attention_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               window: int | None = None) -> torch.Tensor:
    """One query token per sequence, all in one batched call: gather each sequence's blocks, then
    one masked SDPA. query: [B, Hq, D]."""
    keys, values = _gather_keys(k_cache, block_tables), _gather_values(v_cache, block_tables)
    positions = torch.arange(keys.shape[2], device=query.device)
    mask = _visible(positions, context_lens - 1, window)  # [B, L]: each sequence's one query
    out = F.scaled_dot_product_attention(query[:, :, None], keys, values, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=True)
    return out[:, :, 0]


def prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, context_len: int, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """One sequence's chunk of q new tokens, the last q of its context_len. query: [q, Hq, D]."""
    num_query = query.shape[0]
    keys = _gather_keys(k_cache, block_table[None])[:, :, :context_len]
    values = _gather_values(v_cache, block_table[None])[:, :, :context_len]
    query_positions = torch.arange(context_len - num_query, context_len, device=query.device)
    mask = _visible(torch.arange(context_len, device=query.device), query_positions, window)
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                              scale: float, window: int | None = None) -> torch.Tensor:
    """The torch reference for a ragged batch: decodes together in one call, prefill chunks one by one."""
    out = torch.empty_like(query)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decodes = [i for i, n in enumerate(query_lens) if n == 1]
    if decodes:
        rows = torch.tensor([starts[i] for i in decodes], device=query.device)
        lens = torch.tensor([context_lens[i] for i in decodes], device=query.device)
        out[rows] = decode_attention_reference(query[rows], k_cache, v_cache, block_tables[decodes], lens, scale,
                                               window)
    for i, n in enumerate(query_lens):
        if n > 1:
            out[starts[i] : starts[i + 1]] = prefill_attention(
                query[starts[i] : starts[i + 1]], k_cache, v_cache, block_tables[i], context_lens[i], scale, window)
    return out


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                    scale: float, layout: tuple[torch.Tensor, torch.Tensor] | None = None,
                    window: int | None = None) -> torch.Tensor:
    """Ragged batch -> [T, Hq, D], in one kernel call: our C++ kernel for float32 on CPU, Triton on
    CUDA, the torch reference otherwise. `layout`: token_layout(query_lens, context_lens), when the
    caller has it already (it is the same for every layer of a step). `window`: a sliding window,
    each token seeing only the last `window` positions up to its own (Gemma 3's local layers)."""
    if query.device.type == "cuda":
        from kernels.triton_paged_attention import paged_attention_triton  # Triton only where it runs

        return paged_attention_triton(query, k_cache, v_cache, block_tables, query_lens, context_lens, scale, layout,
                                      window)
    if query.dtype == torch.float32 and k_cache.dtype == torch.float32 and (ops := native_ops()) is not None:
        token_seq, token_visible = layout or token_layout(query_lens, context_lens, query.device)
        return ops.paged_attention(query, k_cache, v_cache, block_tables, token_seq, token_visible, scale,
                                   window or 0)
    return paged_attention_reference(query, k_cache, v_cache, block_tables, query_lens, context_lens, scale, window)
