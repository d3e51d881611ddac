"""The compressed checkpoint on disk: a Hugging Face folder whose weights may be stored compressed.

    config.json, tokenizer files ...   as in the source model (the job that compresses copies them)
    model.safetensors                  plain tensors under their HF names; a compressed layer's buffers
                                       under its module name (model.layers.0.mlp.up_proj.codes, .scale)
    compression.json                   the recipe, a per-step report, and each compressed module's
                                       format (a name in FORMATS) and arguments

`write_checkpoint` stores the weights and compression.json; `read_weights` reads any Hugging Face
folder's weights back, one at a time, for whichever model (transformers', the engine's) loads them:
plain tensors as they are, compressed layers rebuilt exactly (the same tensors, bit for bit).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.compressed import CompressedLinear
from kernels.low_rank import LowRankLinear
from kernels.quant_linear import (Int2WeightOnlyLinear, Int3WeightOnlyLinear, Int4WeightOnlyLinear,
                                  Int8WeightOnlyLinear)
from kernels.sparse_linear import SemiStructuredLinear, SparseLinear
from kernels.w8a8_linear import W8A8Linear

COMPRESSION_FILE = "compression.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_VERSION = 1
# The name compression.json gives each layer's format.
FORMATS: dict[str, type[CompressedLinear]] = {
    "int8_weight_only": Int8WeightOnlyLinear,
    "int4_weight_only": Int4WeightOnlyLinear,
    "int3_weight_only": Int3WeightOnlyLinear,
    "int2_weight_only": Int2WeightOnlyLinear,
    "w8a8": W8A8Linear,
    "low_rank": LowRankLinear,
    "sparse": SparseLinear,
    "sparse_2of4": SemiStructuredLinear,
}
FORMAT_NAMES = {layer_class: name for name, layer_class in FORMATS.items()}


def format_entry(layer: CompressedLinear) -> dict:
    """What compression.json says of a compressed module: its format and its arguments."""
    return {"format": FORMAT_NAMES[type(layer)], "args": layer.format_args()}


def layer_from_entry(entry: dict, tensors: dict[str, torch.Tensor]) -> CompressedLinear:
    """The layer a module's entry in compression.json and its stored buffers describe."""
    if entry["format"] not in FORMATS:
        raise ValueError(f"unknown compressed format {entry['format']!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[entry["format"]].from_state(tensors, entry["args"])


def write_checkpoint(out_dir: Path, tensors: dict[str, torch.Tensor], layers: dict[str, CompressedLinear],
                     recipe: dict, report: list[dict]) -> None:
    """Store the plain `tensors` and the compressed `layers` (by module name) in `out_dir`, with the
    recipe and report that made them."""
    stored = dict(tensors)
    for module, layer in layers.items():
        stored.update({f"{module}.{key}": t for key, t in layer.state_dict().items()})
    save_file({name: t.detach().contiguous() for name, t in stored.items()}, Path(out_dir) / WEIGHTS_FILE,
              metadata={"format": "pt"})
    modules = {module: format_entry(layer) for module, layer in layers.items()}
    manifest = {"version": CHECKPOINT_VERSION, "recipe": recipe, "report": report, "modules": modules}
    (Path(out_dir) / COMPRESSION_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def is_compressed_checkpoint(path: Path) -> bool:
    return (Path(path) / COMPRESSION_FILE).is_file()


def _manifest_modules(path: Path) -> dict[str, dict]:
    """Module name -> its entry in compression.json; empty for a plain Hugging Face folder."""
    if not is_compressed_checkpoint(path):
        return {}
    manifest = json.loads((Path(path) / COMPRESSION_FILE).read_text())
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: compressed checkpoint version {manifest.get('version')} is not {CHECKPOINT_VERSION}")
    return manifest["modules"]


def read_weights(path: Path) -> Iterator[tuple[str, torch.Tensor | CompressedLinear]]:
    """A Hugging Face folder's weights, read one at a time: each plain tensor under its name, each
    compressed layer, rebuilt from its buffers, under its module's name."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no .safetensors weights")
    modules = _manifest_modules(path)
    unread = set(modules)
    for file in files:
        with safe_open(file, "pt") as f:
            buffers: dict[str, dict[str, torch.Tensor]] = {}  # compressed module -> its buffers
            for name in f.keys():
                module, _, key = name.rpartition(".")
                if module in modules:
                    buffers.setdefault(module, {})[key] = f.get_tensor(name)
                else:
                    yield name, f.get_tensor(name)
        for module, tensors in buffers.items():
            unread.discard(module)
            yield module, layer_from_entry(modules[module], tensors)
    if unread:
        raise ValueError(f"{path}: no tensors for compressed modules {', '.join(sorted(unread)[:5])}")
