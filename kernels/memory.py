"""Large CPU buffers on transparent huge pages.

A paged KV cache is read as scattered 4 KiB chunks; on 4 KiB pages nearly every chunk also costs
a TLB miss and a page walk. Linux backs memory with 2 MiB pages when asked (madvise), which the
common "madvise" THP setting otherwise never does. Without Linux or THP this is a plain zeros().
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def _madvise_huge(tensor: torch.Tensor) -> bool:
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the 2 MiB-aligned interior
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype) on the CPU, advised onto huge pages before its memory is first touched."""
    tensor = torch.empty(shape, dtype=dtype)
    if sys.platform.startswith("linux"):
        _madvise_huge(tensor)
    return tensor.zero_()
