"""A stored compressed layer sliced for one tensor-parallel rank, reading only that rank's share.

Tensor parallelism splits each linear one of two ways:
- COLUMN (q/k/v, gate/up): a rank keeps output rows [start, stop), bias rows included.
- ROW (o_proj, down_proj): a rank keeps input columns [start, stop); the ranks' outputs are summed
  (all-reduce) and the bias must be added once, after the sum: `shard_layer` returns it apart.

A compressed layer is a few buffers plus format arguments (kernels/compressed.py). Per format, a
rule here says which slice of each buffer a shard needs, and where a split cannot fall: inside a
group of inputs that share a scale, inside a byte that packs several inputs. `check_shardable`
decides from buffer shapes and arguments alone (the safetensors header, compression.json), so an
engine can refuse a tensor_parallel_size before it reads a weight; `shard_layer` reads the slices
through a `read` callback backed by safetensors' get_slice. Every read is a slice except where a
format scatters a shard's share over the whole buffer: a sparse layer's kept values and mask, by ROW,
and the rows of the mask above a COLUMN shard (see SparseRule).

W8A8 with dynamic activations split by ROW needs more than slicing: each rank sees part of a
token's row, so the engine must set the local layer's `amax_reduce` to an all-reduce(MAX) across
ranks (kernels/w8a8_linear.py), or the shards quantize with scales the unsharded layer does not use.

RULES is keyed by the names of kernels.checkpoint.FORMATS and kept equal to it by a test, rather than
importing it: kernels.checkpoint may then import this module without closing an import cycle.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kernels.compressed import CompressedLinear
from kernels.low_rank import LowRankLinear
from kernels.quant_linear import (Int2WeightOnlyLinear, Int3WeightOnlyLinear, Int4WeightOnlyLinear,
                                  Int8WeightOnlyLinear, WeightOnlyLinear)
from kernels.sparse_linear import SemiStructuredLinear, SparseLinear, unpack_bits
from kernels.w8a8_linear import W8A8Linear

COLUMN, ROW = 0, 1  # dim: 0 = keep output rows [start, stop); 1 = keep input columns [start, stop)

Index = tuple[slice, ...] | None
Read = Callable[[str, Index], torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
State = tuple[dict[str, torch.Tensor], dict[str, Any]]  # a local layer's buffers and format arguments
WHOLE = None  # read's index for the whole buffer


class ShardError(ValueError):
    """A layer that cannot be split where the tensor-parallel size puts a shard boundary."""


def rows(start: int, stop: int) -> tuple[slice, ...]:
    return (slice(start, stop),)


def columns(start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None), slice(start, stop))


@dataclass(frozen=True)
class Boundary:
    """Input columns come in pieces of `unit` that a ROW shard must not cut: `what` says why in the
    user's terms, `piece` names one such piece."""
    unit: int
    what: str
    piece: str


class Rule:
    """How one format's layer is measured and sliced; subclasses fill in the format's buffers."""

    layer_class: type[CompressedLinear]

    def features(self, shapes: Shapes, args: dict) -> tuple[int, int]:
        """(out_features, in_features) of the stored layer."""
        raise NotImplementedError

    def input_boundaries(self, fmt: str, shapes: Shapes, args: dict) -> list[Boundary]:
        """What a ROW split must respect; none by default."""
        return []

    def column(self, read: Read, shapes: Shapes, args: dict, start: int, stop: int) -> State:
        """Buffers (bias aside) and arguments of the layer computing output rows [start, stop)."""
        raise NotImplementedError

    def row(self, read: Read, shapes: Shapes, args: dict, start: int, stop: int) -> State:
        """Buffers (no bias) and arguments of the layer computing the share of inputs [start, stop)."""
        raise NotImplementedError


class WeightOnlyRule(Rule):
    """codes [out, packed bytes per row], scale [out, groups]: one column per group of inputs, or one
    column for the whole row, which then every ROW shard shares."""

    def __init__(self, layer_class: type[WeightOnlyLinear]):
        self.layer_class = layer_class

    def features(self, shapes, args):
        out, row_bytes = shapes["codes"]
        return out, row_bytes // self.layer_class.bytes_per_pack * self.layer_class.codes_per_pack

    def group_length(self, shapes) -> int | None:
        """Inputs per scale, or None with one scale per row."""
        groups = shapes["scale"][1]
        return None if groups == 1 else self.features(shapes, {})[1] // groups

    def input_boundaries(self, fmt, shapes, args):
        cls, group = self.layer_class, self.group_length(shapes)
        boundaries = []
        if group is not None:
            boundaries.append(Boundary(group, f"{fmt} groups of {group} inputs", "group"))
        if cls.codes_per_pack > 1:
            single = cls.bytes_per_pack == 1
            boundaries.append(Boundary(cls.codes_per_pack, f"{fmt} packs {cls.codes_per_pack} inputs in "
                                       f"{'a byte' if single else f'{cls.bytes_per_pack} bytes'}",
                                       "packed byte" if single else f"{cls.bytes_per_pack}-byte pack"))
        if group is None and cls.native_op is not None:
            # With one scale per row, a shard's width is its group length, which the C++ kernel needs even.
            boundaries.append(Boundary(2, f"{fmt}'s CPU kernel takes an even number of inputs per scale",
                                       "input pair"))
        return boundaries

    def column(self, read, shapes, args, start, stop):
        return {"codes": read("codes", rows(start, stop)), "scale": read("scale", rows(start, stop))}, args

    def row(self, read, shapes, args, start, stop):
        per_pack, pack_bytes = self.layer_class.codes_per_pack, self.layer_class.bytes_per_pack
        codes = read("codes", columns(start // per_pack * pack_bytes, stop // per_pack * pack_bytes))
        group = self.group_length(shapes)
        scale = read("scale", WHOLE) if group is None else read("scale", columns(start // group, stop // group))
        return {"codes": codes, "scale": scale}, args


class W8A8Rule(Rule):
    """codes [out, in], scale [out, 1] per output row, input_scale (static activations) shared."""

    layer_class = W8A8Linear

    def features(self, shapes, args):
        out, in_features = shapes["codes"]
        return out, in_features

    def shared(self, read: Read, shapes: Shapes) -> dict[str, torch.Tensor]:
        return {"input_scale": read("input_scale", WHOLE)} if "input_scale" in shapes else {}

    def column(self, read, shapes, args, start, stop):
        own = {"codes": read("codes", rows(start, stop)), "scale": read("scale", rows(start, stop))}
        return {**own, **self.shared(read, shapes)}, args

    def row(self, read, shapes, args, start, stop):
        own = {"codes": read("codes", columns(start, stop)), "scale": read("scale", WHOLE)}
        return {**own, **self.shared(read, shapes)}, args


class LowRankRule(Rule):
    """up [out, rank] @ down [rank, in]: outputs are rows of up, inputs columns of down."""

    layer_class = LowRankLinear

    def features(self, shapes, args):
        return shapes["up"][0], shapes["down"][1]

    def column(self, read, shapes, args, start, stop):
        return {"up": read("up", rows(start, stop)), "down": read("down", WHOLE)}, args

    def row(self, read, shapes, args, start, stop):
        return {"up": read("up", WHOLE), "down": read("down", columns(start, stop))}, args


class SparseRule(Rule):
    """mask [out, ceil(in / 8)] bits, 8 inputs a byte; values: the kept weights, row after row."""

    layer_class = SparseLinear

    def features(self, shapes, args):
        return shapes["mask"][0], args["in_features"]

    def input_boundaries(self, fmt, shapes, args):
        return [Boundary(8, f"{fmt} packs the mask bits of 8 inputs in a byte", "mask byte")]

    def column(self, read, shapes, args, start, stop):
        # The shard's values start after every kept weight of the rows above it: counting them takes
        # those rows of the mask (1/32 of their dense bytes); the values read are the shard's only.
        in_features = args["in_features"]
        mask = read("mask", rows(0, stop))
        kept_per_row = unpack_bits(mask, in_features).sum(1)
        first = int(kept_per_row[:start].sum())
        values = read("values", (slice(first, first + int(kept_per_row[start:].sum())),))
        return {"mask": mask[start:].clone(), "values": values}, args  # a copy: not a view pinning rows 0..stop

    def row(self, read, shapes, args, start, stop):
        # A column range's kept values are scattered through every row of `values`: reading them
        # costs the whole buffer (and the whole mask, to find them) — sparse saves disk, not this.
        in_features = args["in_features"]
        mask = read("mask", WHOLE)
        kept = unpack_bits(mask, in_features)
        in_shard = torch.zeros_like(kept)
        in_shard[:, start:stop] = True
        values = read("values", WHOLE)[in_shard[kept]]
        local_mask = mask[:, start // 8:-(-stop // 8)].contiguous()
        return {"mask": local_mask, "values": values}, {**args, "in_features": stop - start}


class SemiStructuredRule(Rule):
    """values [out, in / 2] (two per group of 4 inputs), positions [out, in / 8] (two groups a byte)."""

    layer_class = SemiStructuredLinear

    def features(self, shapes, args):
        out, kept = shapes["values"]
        return out, kept * 2

    def input_boundaries(self, fmt, shapes, args):
        return [Boundary(8, f"{fmt} packs the positions of 8 inputs (two groups of 4) in a byte", "positions byte")]

    def column(self, read, shapes, args, start, stop):
        return {"values": read("values", rows(start, stop)), "positions": read("positions", rows(start, stop))}, args

    def row(self, read, shapes, args, start, stop):
        values = read("values", columns(start // 2, stop // 2))
        return {"values": values, "positions": read("positions", columns(start // 8, stop // 8))}, args


RULES: dict[str, Rule] = {
    "int8_weight_only": WeightOnlyRule(Int8WeightOnlyLinear),
    "int4_weight_only": WeightOnlyRule(Int4WeightOnlyLinear),
    "int3_weight_only": WeightOnlyRule(Int3WeightOnlyLinear),
    "int2_weight_only": WeightOnlyRule(Int2WeightOnlyLinear),
    "w8a8": W8A8Rule(),
    "low_rank": LowRankRule(),
    "sparse": SparseRule(),
    "sparse_2of4": SemiStructuredRule(),
}


def _rule(fmt: str, label: str) -> Rule:
    if fmt not in RULES:
        raise ShardError(f"{label}: no tensor-parallel split for format {fmt!r}; known: {', '.join(sorted(RULES))}")
    return RULES[fmt]


def _check_boundary(boundary: Boundary, needed: int, label: str, start: int, stop: int, in_features: int) -> None:
    """Both ends on a piece boundary; the end of the row always is one (a last, partial mask byte)."""
    if start % boundary.unit == 0 and (stop % boundary.unit == 0 or stop == in_features):
        return
    edge, verb = (start, "start") if start % boundary.unit else (stop, "end")
    raise ShardError(f"{label}: {boundary.what}; the shard of inputs {start}..{stop} would {verb} inside "
                     f"{boundary.piece} {edge // boundary.unit}; use a tensor_parallel_size whose shards start on "
                     f"a {boundary.piece} boundary (multiples of {needed} inputs)")


def check_shardable(fmt: str, shapes: Shapes, args: dict, dim: int, start: int, stop: int, module: str = "") -> None:
    """Raise ShardError if the layer cannot be split there; reads no tensor (shapes from the
    safetensors header, args from compression.json)."""
    label = module or f"a {fmt} layer"
    rule = _rule(fmt, label)
    if dim not in (COLUMN, ROW):
        raise ShardError(f"{label}: dim must be COLUMN ({COLUMN}, output rows) or ROW ({ROW}, input columns), "
                         f"got {dim}")
    try:
        out_features, in_features = rule.features(shapes, args)
    except (KeyError, ValueError) as missing:  # ValueError: a shape with other dimensions than the format's
        raise ShardError(f"{label}: stored buffers {sorted(shapes)} and arguments {args} do not make a {fmt} "
                         f"layer") from missing
    size, what = (out_features, "outputs") if dim == COLUMN else (in_features, "inputs")
    if not 0 <= start < stop <= size:
        raise ShardError(f"{label}: the shard of {what} {start}..{stop} is empty or outside the layer's {size} "
                         f"{what}; use a tensor_parallel_size of at most {size}")
    if dim == ROW:
        boundaries = rule.input_boundaries(fmt, shapes, args)
        needed = math.lcm(*(b.unit for b in boundaries))  # one size that satisfies every boundary
        for boundary in boundaries:
            _check_boundary(boundary, needed, label, start, stop, in_features)


def shard_layer(fmt: str, read: Read, shapes: Shapes, args: dict, dim: int, start: int, stop: int,
                module: str = "") -> tuple[CompressedLinear, torch.Tensor | None]:
    """The local layer for this shard and, for ROW, the full bias to add after the all-reduce (None
    if no bias; the local layer has no bias). For COLUMN the local layer carries its bias slice and
    the second item is None.
    `read(buffer_name, index)` returns the buffer sliced by `index` (a tuple of slices, or None for
    the whole buffer) — backed by safetensors' get_slice, so only the slice is read from disk."""
    check_shardable(fmt, shapes, args, dim, start, stop, module)
    rule = RULES[fmt]
    has_bias = "bias" in shapes
    if dim == COLUMN:
        tensors, local_args = rule.column(read, shapes, args, start, stop)
        if has_bias:
            tensors["bias"] = read("bias", rows(start, stop))
        return rule.layer_class.from_state(tensors, local_args), None
    tensors, local_args = rule.row(read, shapes, args, start, stop)
    return rule.layer_class.from_state(tensors, local_args), read("bias", WHOLE) if has_bias else None
