"""Open a model by name, path or URI, verify it against its manifest, load it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cluster.errors import UserError
from cluster.store import Artifact, Store, materialize, open_artifact
from kernels.checkpoint import is_compressed_checkpoint, read_weights


def open_model(ref: str, store: Store | None = None) -> Artifact:
    """The model `ref` names; it must be a Hugging Face folder."""
    artifact = open_artifact(ref, "models", store)
    if artifact.fs.get_file_info(artifact.file_path("config.json")).type != pafs.FileType.File:
        raise UserError(f"{ref} is not a Hugging Face model folder (no config.json)")
    return artifact


def model_dir(ref: str, store: Store | None = None) -> Path:
    """A local, verified copy of the model's folder."""
    return materialize(open_model(ref, store))


def context_length(path: Path) -> int:
    config = AutoConfig.from_pretrained(path).get_text_config()
    return int(config.max_position_embeddings)


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers model; a compressed checkpoint comes with its compressed layers in place."""
    if is_compressed_checkpoint(path):
        return _load_compressed(path, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _load_compressed(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors, layers = {}, set()
    for name, weight in read_weights(path):
        if isinstance(weight, torch.Tensor):
            tensors[name] = weight
        else:
            model.set_submodule(name, weight)
            layers.add(name)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied and m.rpartition(".")[0] not in layers]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def tokenizer_sha256(path: Path) -> str | None:
    """Fingerprint of a model's tokenizer, to catch data tokenized for another model."""
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    return hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()


def has_other_tokenizer(path: Path, fingerprint: str | None) -> bool:
    """Whether the model at `path` has, provably, another tokenizer than the one `fingerprint` names;
    a missing fingerprint on either side (no tokenizer.json) proves nothing."""
    own = tokenizer_sha256(path)
    return None not in (own, fingerprint) and own != fingerprint
