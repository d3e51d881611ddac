"""Prepare a corpus: text -> tokenized Parquet shards (train/validation) with a manifest.

    python -m jobs.prepare_data --config configs/jobs/data_shakespeare.yaml
    ray job submit --working-dir . -- python -m jobs.prepare_data --config configs/jobs/data_shakespeare.yaml

A dataset already stored under the config's name is verified and left alone unless
`overwrite: true` (or `--overwrite`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pydantic import Field
from tqdm import tqdm

from cluster.config import StrictConfig, load_config
from cluster.errors import reports_user_errors
from cluster.store import Store, human_bytes, verify
from jobs.data.prepared import tokenizer_entry
from jobs.data.shards import ROW_TOKENS, token_stream, write_shards
from jobs.data.sources import Source, read_documents
from jobs.data.split import split_documents
from jobs.models.load import load_tokenizer, model_dir


class PrepareDataConfig(StrictConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="dataset name in the store")
    tokenizer: str = Field(description="a model (name, path or URI) whose tokenizer is used")
    source: Source
    validation_fraction: float = Field(0.05, gt=0, lt=1)
    shard_tokens: int = Field(1_000_000, ge=ROW_TOKENS)
    store: str | None = Field(None, description="store URI; default $RAYFOUNDRY_STORE or ~/.rayfoundry/store")
    overwrite: bool = False


def prepare(config: PrepareDataConfig, config_path: str) -> dict:
    store = Store(config.store)
    existing = store.get("datasets", config.name)
    if existing is not None and not config.overwrite:
        verify(existing)
        print(f"dataset '{config.name}' is already prepared, nothing to do ({existing.uri})")
        return existing.manifest
    tokenizer_path = model_dir(config.tokenizer, store)
    documents = read_documents(config.source)
    splits = split_documents(documents, config.validation_fraction)
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.model_max_length = sys.maxsize  # whole documents here, not model inputs: no length warning
    separator = tokenizer.eos_token_id
    with tempfile.TemporaryDirectory(prefix="rayfoundry-data-") as tmp:
        summary = {}
        for split, docs in splits.items():
            with tqdm(total=len(docs), desc=f"tokenize {split}", unit="doc", file=sys.stderr) as bar:
                stream = token_stream(tokenizer, [d.text for d in docs], separator, progress=bar.update)
            shards = write_shards(stream, Path(tmp), split, config.shard_tokens)
            summary[split] = {"tokens": int(len(stream)), "documents": len(docs), "shards": shards}
        meta = {
            "source": config.source.model_dump(),
            "tokenizer": tokenizer_entry(config.tokenizer, tokenizer_path, tokenizer),
            "validation_fraction": config.validation_fraction,
            "row_tokens": ROW_TOKENS,
            "splits": summary,
            "recreate": f"python -m jobs.prepare_data --config {config_path} --overwrite",
        }
        artifact = store.put_dir("datasets", config.name, Path(tmp), meta, replace=config.overwrite)
    return artifact.manifest


def print_summary(manifest: dict) -> None:
    print(f"{'split':<12}{'documents':>10}{'tokens':>12}{'shards':>8}")
    for split, info in manifest["splits"].items():
        print(f"{split:<12}{info['documents']:>10}{info['tokens']:>12,}{len(info['shards']):>8}")
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"dataset '{manifest['name']}': {human_bytes(total)}")


@reports_user_errors("prepare_data")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file (see configs/jobs/data_*.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    config = load_config(PrepareDataConfig, args.config)
    if args.overwrite:
        config.overwrite = True
    started = time.perf_counter()
    manifest = prepare(config, args.config)
    print_summary(manifest)
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
