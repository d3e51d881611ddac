"""KV-cache buffers on huge pages: zeroed like torch.zeros, and advised onto 2 MiB pages on Linux."""
from pathlib import Path

import pytest
import torch

from kernels.memory import HUGE_PAGE, _madvise_huge, zeros_on_huge_pages


def test_zeros_on_huge_pages_is_zeros():
    tensor = zeros_on_huge_pages((3, 5, 7), torch.float32)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32 and not tensor.any()


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="no transparent huge pages")
def test_madvise_accepts_a_large_buffer_and_skips_a_small_one():
    assert _madvise_huge(torch.empty(4 * HUGE_PAGE // 4))  # 4 MiB of float32 spans a whole huge page
    assert not _madvise_huge(torch.empty(16))
