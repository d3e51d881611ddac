"""A decoder's per-token layers, fused: residual add + RMSNorm, RMSNorm, rotary embedding, SiLU-and-mul
(and GELU-and-mul, for Gemma).

Each function runs our C++ kernel (kernels/csrc/norm_rotary_cpu.cpp) for float32 CPU tensors
and the torch reference otherwise; both compute in float32 like Hugging Face's Llama.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu_ops import native_ops


def _native(*tensors: torch.Tensor):
    """Our kernels when they apply: float32 CPU tensors, and no autograd graph being recorded."""
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not recording and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return native_ops()
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() == 2 and x.stride(-1) == 1 and (ops := _native(x, weight)) is not None:
        return ops.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x). The native path updates x and residual in place."""
    if x.dim() == 2 and x.is_contiguous() and residual.is_contiguous() and (ops := _native(x, residual, weight)):
        ops.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = residual + x
    return F.rms_norm(residual, (x.shape[-1],), weight, eps), residual


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [T, heads, head_dim] by cos, sin [T, head_dim / 2].
    The native path rotates x in place (x may be a view into a fused qkv output)."""
    if x.stride(-1) == 1 and (ops := _native(x, cos, sin)) is not None:
        ops.rotary_(x, cos, sin)
        return x
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [T, 2 * inter] gate_up projection."""
    if gate_up.dim() == 2 and gate_up.stride(-1) == 1 and (ops := _native(gate_up)) is not None:
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, tanh approximation) * up of a fused [T, 2 * inter] gate_up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
