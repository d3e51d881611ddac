"""The Triton paged-attention kernel against the torch reference: on a GPU when there is one,
otherwise under Triton's interpreter on CPU. The interpreter must be chosen before Triton's own
library is first decorated, so on CPU each case runs in a fresh interpreter process with
TRITON_INTERPRET=1 (earlier tests in this session may already have imported Triton)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is in the test extras: pip install -e '.[test]'")

CASES = [(9, 3, 64, None), (4, 4, 16, None), (8, 1, 32, None), (4, 1, 32, 24)]  # (heads, kv_heads, head_dim, window)
REPO = Path(__file__).resolve().parent.parent


def compare(heads: int, kv_heads: int, dim: int, window: int | None, device: str) -> float:
    """Largest difference between Triton and the reference on a ragged batch; asserts closeness."""
    from kernels.paged_attention import kv_cache_shapes, paged_attention
    from kernels.triton_paged_attention import paged_attention_triton

    generator = torch.Generator().manual_seed(heads * dim)
    block_size, num_blocks = 16, 40
    k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, kv_heads, dim)
    k_cache, v_cache = torch.randn(k_shape, generator=generator), torch.randn(v_shape, generator=generator)
    sequences = [(40, 40), (17, 1), (33, 5), (1, 1), (64, 1), (20, 3)]  # (context, new tokens)
    width = max(-(-c // block_size) for c, _ in sequences)
    tables = torch.randperm(num_blocks, generator=generator)[: len(sequences) * width].view(len(sequences), width)
    query = torch.randn(sum(n for _, n in sequences), heads, dim, generator=generator)
    query_lens, context_lens = [n for _, n in sequences], [c for c, _ in sequences]
    expected = paged_attention(query, k_cache, v_cache, tables, query_lens, context_lens, dim**-0.5, window=window)
    on_device = [t.to(device) for t in (query, k_cache, v_cache, tables)]
    out = paged_attention_triton(*on_device, query_lens, context_lens, dim**-0.5, window=window).cpu()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    return (out - expected).abs().max().item()


def _run_interpreted(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_triton_matches_reference_on_ragged_batches():
    if torch.cuda.is_available():
        for case in CASES:
            compare(*case, "cuda")
        return
    done = _run_interpreted("from tests.test_triton_paged_attention import CASES, compare\n"
                            "for case in CASES:\n"
                            "    print(case, 'max difference', compare(*case, 'cpu'))\n")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("max difference") == len(CASES)


def test_triton_refuses_non_power_of_two_head_dim():
    from kernels.paged_attention import kv_cache_shapes
    from kernels.triton_paged_attention import paged_attention_triton

    k_shape, v_shape = kv_cache_shapes(2, 16, 1, 24)
    with pytest.raises(ValueError, match="power-of-two"):
        paged_attention_triton(torch.zeros(1, 1, 24), torch.zeros(k_shape), torch.zeros(v_shape),
                               torch.zeros(1, 1, dtype=torch.long), [1], [1], 1.0)
