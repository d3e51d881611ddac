"""The compressed checkpoint on disk: a Hugging Face folder whose weights may be stored compressed.

    config.json, tokenizer files ...   as in the source model (the job that compresses copies them)
    model.safetensors                  plain tensors under their HF names; a compressed layer's buffers
                                       under its module name (model.layers.0.mlp.up_proj.codes, .scale)
    compression.json                   the recipe, a per-step report, and each compressed module's
                                       format (a name in FORMATS) and arguments

`write_checkpoint` stores the weights and compression.json; `read_weights` reads any Hugging Face
folder's weights back, one at a time, for whichever model (transformers', the engine's) loads them:
plain tensors as they are, compressed layers rebuilt exactly (the same tensors, bit for bit). Given a
`split` (a tensor-parallel rank's share of each module), it reads only that share from disk.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.compressed import CompressedLinear
from kernels.low_rank import LowRankLinear
from kernels.shard import ROW, check_shardable, shard_layer
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


# A module's share under tensor parallelism: (dim, start, stop), dim 0 = output rows, 1 = inputs.
Split = tuple[int, int, int]


def read_weights(path: Path, split: Callable[[str], Split | None] = lambda module: None
                 ) -> Iterator[tuple[str, torch.Tensor | CompressedLinear]]:
    """A Hugging Face folder's weights, read one at a time: each plain tensor under its name, each
    compressed layer, rebuilt from its buffers, under its module's name. `split(module)` names the
    part of a module to read (None: all of it); a row-split (dim 1) module's bias is read whole."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no .safetensors weights")
    modules = _manifest_modules(path)
    unread = set(modules)
    for file in files:
        with safe_open(file, "pt") as f:
            buffers: dict[str, list[str]] = {}  # compressed module -> its buffers' names
            for name in f.keys():
                module, _, key = name.rpartition(".")
                if module in modules:
                    buffers.setdefault(module, []).append(key)
                else:
                    yield name, _read_tensor(f, name, split(module), key)
            for module, keys in buffers.items():
                unread.discard(module)
                yield module, _read_layer(f, module, keys, modules[module], split(module))
    if unread:
        raise ValueError(f"{path}: no tensors for compressed modules {', '.join(sorted(unread)[:5])}")


def check_splits(path: Path, splits: Callable[[str], list[Split]]) -> None:
    """ShardError if a compressed module cannot be split as `splits(module)` asks (every rank's
    share): from the files' headers and compression.json, before anything is loaded."""
    modules = _manifest_modules(path)
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            shapes: dict[str, dict[str, tuple[int, ...]]] = {}
            for name in f.keys():
                module, _, key = name.rpartition(".")
                if module in modules:
                    shapes.setdefault(module, {})[key] = tuple(f.get_slice(name).get_shape())
        for module, module_shapes in shapes.items():
            entry = modules[module]
            for part in splits(module):
                check_shardable(entry["format"], module_shapes, entry["args"], *part, module=module)


def _read_tensor(f, name: str, part: Split | None, key: str) -> torch.Tensor:
    if part is None or (part[0] == ROW and key == "bias"):
        return f.get_tensor(name)
    dim, start, stop = part
    return f.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]


def _read_layer(f, module: str, keys: list[str], entry: dict, part: Split | None) -> CompressedLinear:
    if part is None:
        return layer_from_entry(entry, {key: f.get_tensor(f"{module}.{key}") for key in keys})
    shapes = {key: tuple(f.get_slice(f"{module}.{key}").get_shape()) for key in keys}

    def read(key: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        name = f"{module}.{key}"
        return f.get_tensor(name) if index is None else f.get_slice(name)[index]

    layer, bias = shard_layer(entry["format"], read, shapes, entry["args"], *part, module=module)
    if bias is not None:
        layer._set_bias(bias)  # whole, as a plain row-split layer's: the model keeps it on one rank
    return layer
