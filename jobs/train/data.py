"""Token windows for training, cut from the dataset rows each worker's Ray Data shard streams."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def window_batches(shard, seq_len: int, micro_batch: int) -> Iterator[torch.Tensor]:
    """[micro_batch, seq_len] int64 batches of consecutive windows, epoch after epoch, forever."""
    while True:
        pending: list[np.ndarray] = []
        for batch in shard.iter_batches(batch_size=8, batch_format="numpy"):
            for row in batch["tokens"]:
                row = np.asarray(row, dtype=np.int64)
                for start in range(0, len(row) - seq_len + 1, seq_len):
                    pending.append(row[start : start + seq_len])
                    if len(pending) == micro_batch:
                        yield torch.from_numpy(np.stack(pending))
                        pending = []


def rank_windows(tokens: np.ndarray, window: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the full windows, the same count on every rank (ZeRO-3 gathers
    parameters collectively, so every rank must run as many forwards as the others)."""
    count = len(tokens) // window // world * world
    if count == 0:
        raise ValueError(f"need at least {window * world} validation tokens for {world} workers")
    windows = torch.from_numpy(tokens[: count * window].astype(np.int64)).view(count, window)
    return windows[rank::world]
