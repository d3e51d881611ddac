"""Attention over the paged KV cache in Triton, for CUDA (and Triton's interpreter on CPU).

Same contract as kernels.paged_attention.paged_attention: a ragged batch of prefill chunks and
decodes, keys/values read in place through the block tables (layout: kv_cache_shapes there).
One program per (query token, KV head) computes the query heads of
that KV head's group together, with an online softmax over the token's visible context, one
cache block per iteration. It is a decode-oriented kernel: long prefills want query tiling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ragged_batch import token_layout


@triton.jit
def _paged_attention_kernel(
    query, k_cache, v_cache, out, block_tables, token_seq, token_visible, scale, table_width,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_kd, stride_ks, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ot, stride_oh, window,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(token_seq + token)
    visible = tl.load(token_visible + token)  # this token attends to cache positions [first, visible)
    first = tl.where(window > 0, tl.maximum(visible - window, 0), 0)
    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group
    dims = tl.arange(0, HEAD_DIM)
    head_ok = group < GROUP
    q = tl.load(query + token * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=head_ok[:, None],
                other=0.0).to(tl.float32) * scale

    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for start in range(first // BLOCK_SIZE * BLOCK_SIZE, visible, BLOCK_SIZE):
        block = tl.load(block_tables + seq * table_width + start // BLOCK_SIZE).to(tl.int64)
        in_context = (start + offsets < visible) & (start + offsets >= first)
        key_rows = block * stride_kb + kv_head * stride_kh + offsets[:, None] * stride_ks + dims[None, :] * stride_kd
        value_rows = block * stride_vb + kv_head * stride_vh + offsets[:, None] * stride_vs + dims[None, :] * stride_vd
        keys = tl.load(k_cache + key_rows, mask=in_context[:, None], other=0.0).to(tl.float32)
        values = tl.load(v_cache + value_rows, mask=in_context[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
        scores = tl.where(in_context[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        probs = tl.exp(scores - new_best[:, None])
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * values[None, :, :], axis=1)
        best = new_best
    result = acc / total[:, None]
    tl.store(out + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             result.to(out.dtype.element_ty), mask=head_ok[:, None])


def paged_attention_triton(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int],
                           scale: float, layout: tuple[torch.Tensor, torch.Tensor] | None = None,
                           window: int | None = None) -> torch.Tensor:
    """query [T, Hq, D] -> [T, Hq, D]; see kernels.paged_attention for the batch layout."""
    num_tokens, num_heads, head_dim = query.shape
    _, num_kv_heads, _, block_size = k_cache.shape
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"the Triton kernel needs power-of-two head_dim and block_size, got {head_dim}, {block_size}")
    token_seq, token_visible = layout or token_layout(query_lens, context_lens, query.device)
    query = query.contiguous()
    block_tables = block_tables.contiguous()
    out = torch.empty_like(query)
    group = num_heads // num_kv_heads
    _paged_attention_kernel[(num_tokens, num_kv_heads)](
        query, k_cache, v_cache, out, block_tables, token_seq, token_visible, scale, block_tables.shape[1],
        query.stride(0), query.stride(1), *k_cache.stride(), *v_cache.stride(), out.stride(0), out.stride(1),
        window or 0, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 2), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
    )
    return out
