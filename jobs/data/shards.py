"""Token streams <-> Parquet shards.

A split is one token stream: its documents' tokens in order, each followed by a separator
token. The stream is cut into rows of `ROW_TOKENS` tokens (column `tokens`, list<int32>) and
rows into shards of about `shard_tokens`. Concatenating the rows of the shards in manifest
order gives the stream back exactly; training and evaluation cut their own windows from it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.store import Artifact

ROW_TOKENS = 2048
SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.int32()))])


def token_stream(tokenizer, texts: list[str], separator_id: int, batch: int = 16, progress=None) -> np.ndarray:
    """Each text's tokens followed by `separator_id`, concatenated; `progress(n)` after each batch."""
    pieces = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([separator_id], dtype=np.int32))
        if progress is not None:
            progress(len(encoded))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def write_shards(stream: np.ndarray, out_dir: Path, split: str, shard_tokens: int) -> list[dict]:
    """Write `stream` as `<split>-NNNNN.parquet` files; return [{file, tokens}] in order."""
    rows_per_shard = max(1, shard_tokens // ROW_TOKENS)
    shard_size = rows_per_shard * ROW_TOKENS
    shards = []
    for index, start in enumerate(range(0, len(stream), shard_size)):
        part = stream[start : start + shard_size]
        name = f"{split}-{index:05d}.parquet"
        pq.write_table(_rows_table(part), out_dir / name, compression="zstd")
        shards.append({"file": name, "tokens": int(len(part))})
    return shards


def _rows_table(part: np.ndarray) -> pa.Table:
    offsets = np.arange(0, len(part) + ROW_TOKENS, ROW_TOKENS, dtype=np.int32)
    offsets[-1] = len(part)
    rows = pa.ListArray.from_arrays(pa.array(offsets), pa.array(part, type=pa.int32()))
    return pa.Table.from_arrays([rows], schema=SCHEMA)


def shard_paths(dataset: Artifact, split: str) -> list[str]:
    return [dataset.file_path(s["file"]) for s in dataset.manifest["splits"][split]["shards"]]


def read_tokens(dataset: Artifact, split: str, max_tokens: int | None = None) -> np.ndarray:
    """The first `max_tokens` tokens of a split's stream (all when None)."""
    pieces, total = [], 0
    for path in shard_paths(dataset, split):
        table = pq.read_table(path, filesystem=dataset.fs)
        flat = table.column("tokens").combine_chunks().flatten().to_numpy()
        pieces.append(flat)
        total += len(flat)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return stream if max_tokens is None else stream[:max_tokens]


def ray_dataset(dataset: Artifact, split: str):
    """The split's rows as a Ray Dataset, for training jobs (one `tokens` list per row)."""
    import ray.data

    return ray.data.read_parquet(shard_paths(dataset, split), filesystem=dataset.fs)
