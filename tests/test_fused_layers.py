"""The C++ fused layers against their torch definitions."""
import torch
import torch.nn.functional as F

from kernels.cpu_ops import native_ops
from kernels.fused_layers import add_rms_norm, rms_norm, rotary, silu_and_mul


def _reference_rotary(x, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def test_native_kernels_build():
    assert native_ops() is not None, "the C++ CPU kernels must build here (gcc and ninja are dependencies)"


def test_rms_norm_and_fused_add_match_torch():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(37, 576), torch.randn(37, 576), torch.randn(576)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5))
    expected_residual = residual + x
    expected = F.rms_norm(expected_residual, (576,), weight, 1e-5)
    with torch.inference_mode():
        out, new_residual = add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    torch.testing.assert_close(new_residual, expected_residual)
    torch.testing.assert_close(out, expected)


def test_rotary_in_place_on_a_fused_qkv_view():
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 11, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    angles = torch.rand(tokens, dim // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    expected_q = _reference_rotary(q.reshape(tokens, heads, dim), cos, sin)
    expected_k = _reference_rotary(k.reshape(tokens, kv_heads, dim), cos, sin)
    untouched_v = qkv[:, -kv_heads * dim:].clone()
    with torch.inference_mode():
        out_q = rotary(q.view(tokens, heads, dim), cos, sin)
        out_k = rotary(k.view(tokens, kv_heads, dim), cos, sin)
    torch.testing.assert_close(out_q, expected_q)
    torch.testing.assert_close(out_k, expected_k)
    assert out_q.data_ptr() == q.data_ptr()  # rotated in place, inside the qkv buffer
    assert torch.equal(qkv[:, -kv_heads * dim:], untouched_v)


def test_model_parameters_take_the_native_path_at_inference():
    norm_weight = torch.nn.Parameter(torch.randn(16))
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    with torch.inference_mode():
        out, new_residual = add_rms_norm(x, residual, norm_weight, 1e-6)
    assert out.data_ptr() == x.data_ptr() and new_residual.data_ptr() == residual.data_ptr()  # fused, in place
    out, _ = add_rms_norm(torch.randn(3, 16), torch.randn(3, 16), norm_weight, 1e-6)
    assert out.requires_grad  # training: the torch path, differentiable


def test_other_dtypes_take_the_torch_path():
    x, weight = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), F.rms_norm(x, (8,), weight, 1e-6))


def test_silu_and_mul_matches_torch_with_and_without_a_vector_tail():
    torch.manual_seed(0)
    for inter in (1536, 100):  # 100: 6 vectors of 16 and a scalar tail of 4
        gate_up = torch.randn(13, 2 * inter) * 8  # wide enough to reach exp's clamps
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)
