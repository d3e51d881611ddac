"""The compressed checkpoint: a Hugging Face folder whose weights may be stored compressed.

    config.json, tokenizer files ...   as in the source model (config updated if a step reshaped it)
    model.safetensors                  plain tensors under their HF names; a compressed layer's tensors
                                       under its module name (model.layers.0.mlp.up_proj.codes, .scale)
    compression.json                   the recipe, a per-step report, and each compressed module's
                                       format and arguments (kernels.compressed.FORMATS)

It reloads exactly (the same tensors, bit for bit), loads in our engine and in transformers through
`load_compressed` (jobs.models.load does so for any folder with compression.json; the engine
reads the same layers through kernels.compressed.read_checkpoint), and
`export_dense` writes a plain HF folder with the weights decompressed, for other tools.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from cluster.store import MANIFEST
from kernels.compressed import (CHECKPOINT_VERSION, COMPRESSION_FILE, WEIGHTS_FILE, CompressedLinear,
                                read_checkpoint, read_manifest)

SOURCE_FILES_SKIPPED = (".safetensors", ".safetensors.index.json", ".bin", MANIFEST, COMPRESSION_FILE)


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to store, once: a tied lm_head that stayed plain is the embedding, not a copy."""
    compressed = compressed_modules(model)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if any(name.startswith(prefix + ".") for prefix in compressed):
            continue
        tensors[name] = tensor
    for prefix, layer in compressed.items():
        tensors.update({f"{prefix}.{key}": t for key, t in layer.state_dict().items()})
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in tensors:
        del tensors["lm_head.weight"]
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def save_compressed(model: nn.Module, out_dir: Path, source_dir: Path, recipe: dict, report: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in Path(source_dir).iterdir():
        if file.is_file() and not file.name.endswith(SOURCE_FILES_SKIPPED):
            shutil.copy2(file, out_dir / file.name)
    model.config.save_pretrained(out_dir)  # after the copy: a step may have reshaped the model
    save_file(checkpoint_tensors(model), out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    modules = {name: {"format": layer.FORMAT, "args": layer.format_args()}
               for name, layer in compressed_modules(model).items()}
    manifest = {"version": CHECKPOINT_VERSION, "recipe": recipe, "report": report, "modules": modules}
    (out_dir / COMPRESSION_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def load_compressed(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformers model of a compressed checkpoint, its compressed layers in place."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers, tensors = read_checkpoint(path)
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied and m.rpartition(".")[0] not in layers]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def export_dense(path: Path, out_dir: Path) -> None:
    """A plain Hugging Face folder with every compressed layer decompressed to an nn.Linear."""
    model = load_compressed(path)
    for name, layer in compressed_modules(model).items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight.data = layer.dense_weight().float()
        if layer.bias is not None:
            dense.bias.data = layer.bias.float().clone()
        model.set_submodule(name, dense)
    if "lm_head" in read_manifest(path)["modules"]:
        model.config.tie_word_embeddings = False  # the head now differs from the embedding
    model.save_pretrained(out_dir)
    for file in Path(path).iterdir():
        if file.is_file() and not file.name.endswith(SOURCE_FILES_SKIPPED) and not (out_dir / file.name).exists():
            shutil.copy2(file, out_dir / file.name)
