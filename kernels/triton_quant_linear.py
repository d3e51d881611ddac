"""Weight-only int8/int4 linear in Triton, for CUDA (and Triton's interpreter on CPU).

Same contract as kernels.quant_linear: codes int8 [out, in] or signed int4 packed two per byte
(low nibble first) uint8 [out, in / 2], float32 scales [out, groups]. Each program computes a
[BLOCK_M, BLOCK_N] tile of y = x @ (codes * scale)^T, widening and scaling a [BLOCK_N, BLOCK_K]
tile of codes in registers per step, so the weight crosses memory at its stored size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _weight_only_kernel(
    x, codes, scales, bias, out, M, N, K, group_size, num_groups, stride_xm, stride_cn, stride_om,
    INT4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        x_tile = tl.load(x + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                         other=0.0).to(tl.float32)
        w_mask = (cols[:, None] < N) & (ks[None, :] < K)
        if INT4:
            byte = tl.load(codes + cols[:, None] * stride_cn + ks[None, :] // 2, mask=w_mask, other=0).to(tl.int32)
            nibble = (byte >> ((ks[None, :] % 2) * 4)) & 0xF
            code = tl.where(nibble >= 8, nibble - 16, nibble).to(tl.float32)
        else:
            code = tl.load(codes + cols[:, None] * stride_cn + ks[None, :], mask=w_mask, other=0).to(tl.float32)
        scale = tl.load(scales + cols[:, None] * num_groups + ks[None, :] // group_size, mask=w_mask, other=0.0)
        acc += tl.dot(x_tile, tl.trans(code * scale), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0)[None, :]
    tl.store(out + rows[:, None] * stride_om + cols[None, :], acc.to(out.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def weight_only_linear_triton(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                              bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [rows, in] (fp16/bf16/fp32) -> [rows, out] in x's dtype."""
    if bits not in (4, 8):
        raise ValueError(f"the Triton weight-only kernel reads int8 or int4 codes, not int{bits}")
    rows, inputs = x.shape
    outputs, groups = scales.shape
    x, codes, scales = x.contiguous(), codes.contiguous(), scales.float().contiguous()
    out = torch.empty(rows, outputs, device=x.device, dtype=x.dtype)
    block_m = 16 if rows <= 16 else 64
    block_n, block_k = 64, 32
    grid = (triton.cdiv(rows, block_m), triton.cdiv(outputs, block_n))
    _weight_only_kernel[grid](
        x, codes, scales, scales if bias is None else bias.float().contiguous(), out, rows, outputs, inputs,
        inputs // groups, groups, x.stride(0), codes.stride(0), out.stride(0),
        INT4=bits == 4, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
