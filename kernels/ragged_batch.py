"""A ragged batch (prefill chunks and decodes, one flat run of query rows) as the attention kernels
read it. Its own module so that kernels.paged_attention, which dispatches to the Triton kernel,
and kernels.triton_paged_attention both use it without importing each other."""
from __future__ import annotations

import torch


def token_layout(query_lens: list[int], context_lens: list[int],
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row of a ragged batch: its sequence, and how many cached tokens it sees. A chunk's
    rows are the last query_len tokens of its context, so row j of n sees context - n + j + 1."""
    lens = torch.tensor(query_lens, device=device)
    token_seq = torch.repeat_interleave(torch.arange(len(query_lens), device=device), lens)
    first = torch.tensor(context_lens, device=device) - lens
    starts = torch.cumsum(lens, 0) - lens
    token_visible = first[token_seq] + torch.arange(int(lens.sum()), device=device) - starts[token_seq] + 1
    return token_seq, token_visible
