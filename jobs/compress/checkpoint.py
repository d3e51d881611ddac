"""Writing a compressed model as a checkpoint (format: kernels/checkpoint.py), and exporting one
as a plain Hugging Face folder for other tools.

A checkpoint carries the source model's config and tokenizer files (the config updated if a step
reshaped the model); it loads in our engine and, through jobs.models.load.load_causal_lm, in
transformers.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from cluster.store import MANIFEST
from jobs.models.load import load_causal_lm
from kernels.checkpoint import COMPRESSION_FILE, write_checkpoint
from kernels.compressed import CompressedLinear

SOURCE_FILES_SKIPPED = (".safetensors", ".safetensors.index.json", ".bin", MANIFEST, COMPRESSION_FILE)


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


def _plain_tensors(model: nn.Module, layers: dict[str, CompressedLinear]) -> dict[str, torch.Tensor]:
    """The model's tensors outside its compressed `layers`, each once: a tied lm_head that stayed
    plain is the embedding, not a copy."""
    tensors = {name: t for name, t in model.state_dict().items() if name.rpartition(".")[0] not in layers}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def _copy_source_files(source_dir: Path, out_dir: Path) -> None:
    """The source folder's files other than weights (config, tokenizer, ...)."""
    for file in Path(source_dir).iterdir():
        if file.is_file() and not file.name.endswith(SOURCE_FILES_SKIPPED):
            shutil.copy2(file, out_dir / file.name)


def save_compressed(model: nn.Module, out_dir: Path, source_dir: Path, recipe: dict, report: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_source_files(source_dir, out_dir)
    model.config.save_pretrained(out_dir)  # after the copy: a step may have reshaped the model
    layers = compressed_modules(model)
    write_checkpoint(out_dir, _plain_tensors(model, layers), layers, recipe, report)


def export_dense(path: Path, out_dir: Path) -> None:
    """A plain Hugging Face folder with every compressed layer decompressed to an nn.Linear."""
    model = load_causal_lm(path)
    layers = compressed_modules(model)
    for name, layer in layers.items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight.data = layer.dense_weight().float()
        if layer.bias is not None:
            dense.bias.data = layer.bias.float().clone()
        model.set_submodule(name, dense)
    if "lm_head" in layers:
        model.config.tie_word_embeddings = False  # the head now differs from the embedding
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_source_files(path, out_dir)
    model.save_pretrained(out_dir)  # after the copy: its config and generation config win
