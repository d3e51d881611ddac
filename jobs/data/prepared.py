"""A prepared dataset in the store: its record of the tokenizer that made it, and opening it for a model.

Token ids mean nothing without their tokenizer, so the manifest records which one made them, and a
model reads a dataset only when that tokenizer is its own.
"""
from __future__ import annotations

from pathlib import Path

from cluster.errors import UserError
from cluster.store import Artifact, Store, open_artifact, verify
from jobs.models.load import has_other_tokenizer, tokenizer_sha256


def tokenizer_entry(model: str, path: Path, tokenizer) -> dict:
    """The manifest's `tokenizer`: the model it came from (as the user named it) and its fingerprint."""
    return {"model": model, "sha256": tokenizer_sha256(path), "vocab_size": len(tokenizer),
            "separator_id": tokenizer.eos_token_id}


def open_dataset(ref: str, store: Store) -> Artifact:
    dataset = open_artifact(ref, "datasets", store)
    if dataset.manifest is None or "splits" not in dataset.manifest:
        raise UserError(f"{ref} is not a prepared dataset (no manifest); run `python -m jobs.prepare_data` first")
    verify(dataset)
    return dataset


def check_tokenized_for(dataset: Artifact, model_path: Path, model: str) -> None:
    """Refuse a dataset tokenized for another model; `model` names the model the way the user did."""
    tokenizer = dataset.manifest["tokenizer"]
    if has_other_tokenizer(model_path, tokenizer.get("sha256")):
        raise UserError(f"dataset '{dataset.name}' was tokenized with {tokenizer['model']}'s tokenizer, "
                        f"which differs from {model}'s; prepare the data with `tokenizer: {model}`")
