"""The Triton paged-attention kernel against the torch reference: on a GPU when there is one,
otherwise under Triton's interpreter on CPU (TRITON_INTERPRET=1, set before the kernel is defined)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="Triton is in the test extras: pip install -e '.[test]'")

from kernels.paged_attention import kv_cache_shapes, paged_attention  # noqa: E402
from kernels.triton_paged_attention import paged_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 16), (8, 1, 32)])
def test_triton_matches_reference_on_a_ragged_batch(heads, kv_heads, dim):
    generator = torch.Generator().manual_seed(heads * dim)
    block_size, num_blocks = 16, 40
    k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, kv_heads, dim)
    k_cache, v_cache = torch.randn(k_shape, generator=generator), torch.randn(v_shape, generator=generator)
    sequences = [(40, 40), (17, 1), (33, 5), (1, 1), (64, 1), (20, 3)]  # (context, new tokens)
    width = max(-(-c // block_size) for c, _ in sequences)
    tables = torch.randperm(num_blocks, generator=generator)[: len(sequences) * width].view(len(sequences), width)
    query = torch.randn(sum(n for _, n in sequences), heads, dim, generator=generator)
    query_lens, context_lens = [n for _, n in sequences], [c for c, _ in sequences]
    expected = paged_attention(query, k_cache, v_cache, tables, query_lens, context_lens, dim**-0.5)
    on_device = [t.to(DEVICE) for t in (query, k_cache, v_cache, tables)]
    out = paged_attention_triton(*on_device, query_lens, context_lens, dim**-0.5)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_triton_refuses_non_power_of_two_head_dim():
    k_shape, v_shape = kv_cache_shapes(2, 16, 1, 24)
    with pytest.raises(ValueError, match="power-of-two"):
        paged_attention_triton(torch.zeros(1, 1, 24), torch.zeros(k_shape), torch.zeros(v_shape),
                               torch.zeros(1, 1, dtype=torch.long), [1], [1], 1.0)
