"""Tensor-parallel shards of compressed layers: column shards concatenate to the layer, row shards sum
to it (plus the bias, once), each reads only its share where the format allows, and splits a format
cannot take are refused up front, in the user's terms."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kernels.checkpoint import FORMATS
from kernels.compressed import fuse_rows
from kernels.low_rank import LowRankLinear
from kernels.quant_linear import (Int2WeightOnlyLinear, Int3WeightOnlyLinear, Int4WeightOnlyLinear,
                                  Int8WeightOnlyLinear)
from kernels.shard import COLUMN, ROW, RULES, ShardError, check_shardable, shard_layer
from kernels.sparse_linear import SemiStructuredLinear, SparseLinear
from kernels.w8a8_linear import W8A8Linear

OUT, IN = 96, 128
MODULE = "model.layers.0.mlp.down_proj"


def pruned(linear: nn.Linear, two_of_four: bool) -> nn.Linear:
    """Half the weights zeroed: at random, or the two smallest of every four inputs (2:4)."""
    with torch.no_grad():
        groups = linear.weight.view(linear.out_features, -1, 4)
        if two_of_four:
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
        else:
            keep = torch.rand_like(groups) > 0.5
        groups.mul_(keep)
    return linear


# case -> (format name, how the layer is made from a random nn.Linear)
LAYERS = {
    "int8 per row": ("int8_weight_only", lambda linear: Int8WeightOnlyLinear.from_linear(linear)),
    "int8 groups": ("int8_weight_only", lambda linear: Int8WeightOnlyLinear.from_linear(linear, 32)),
    "int4 per row": ("int4_weight_only", lambda linear: Int4WeightOnlyLinear.from_linear(linear)),
    "int4 groups": ("int4_weight_only", lambda linear: Int4WeightOnlyLinear.from_linear(linear, 32)),
    "int3 per row": ("int3_weight_only", lambda linear: Int3WeightOnlyLinear.from_linear(linear)),
    "int3 groups": ("int3_weight_only", lambda linear: Int3WeightOnlyLinear.from_linear(linear, 32)),
    "int2 groups": ("int2_weight_only", lambda linear: Int2WeightOnlyLinear.from_linear(linear, 32)),
    "w8a8 dynamic": ("w8a8", lambda linear: W8A8Linear.from_linear(linear)),
    "w8a8 static": ("w8a8", lambda linear: W8A8Linear.from_linear(linear, torch.tensor([4 / 127]))),
    "low_rank": ("low_rank", lambda linear: LowRankLinear.from_linear(linear, 16)),
    "sparse": ("sparse", lambda linear: SparseLinear.from_linear(pruned(linear, two_of_four=False))),
    "sparse_2of4": ("sparse_2of4", lambda linear: SemiStructuredLinear.from_linear(pruned(linear, two_of_four=True))),
}
# Dynamic W8A8 row shards need the amax hook: test_w8a8_dynamic_row_shards_need_the_amax_hook.
ROW_CASES = [case for case in LAYERS if case != "w8a8 dynamic"]


def stored(case: str, bias: bool = True):
    """(format, the layer, its stored tensors, their shapes) for a case."""
    fmt, build = LAYERS[case]
    layer = build(nn.Linear(IN, OUT, bias=bias))
    state = layer.state_dict()
    return fmt, layer, state, {name: tuple(t.shape) for name, t in state.items()}


def reader(state: dict[str, torch.Tensor], bytes_read: list[int] | None = None):
    """`read` over tensors in memory; appends each read's byte count to `bytes_read`."""
    def read(name, index):
        tensor = state[name] if index is None else state[name][index]
        if bytes_read is not None:
            bytes_read.append(tensor.numel() * tensor.element_size())
        return tensor
    return read


def even_shards(size: int, tp: int) -> list[tuple[int, int]]:
    return [(rank * size // tp, (rank + 1) * size // tp) for rank in range(tp)]


def test_the_rules_name_the_checkpoint_formats():
    assert {name: rule.layer_class for name, rule in RULES.items()} == FORMATS


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", list(LAYERS))
def test_column_shards_concatenate_to_the_layer(case, tp):
    fmt, layer, state, shapes = stored(case)
    x = torch.randn(5, IN)
    shards = [shard_layer(fmt, reader(state), shapes, layer.format_args(), COLUMN, start, stop, MODULE)
              for start, stop in even_shards(OUT, tp)]
    assert all(row_bias is None for _, row_bias in shards)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([local(x) for local, _ in shards], -1), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", ROW_CASES)
def test_row_shards_sum_to_the_layer_with_the_bias_added_once(case, tp):
    fmt, layer, state, shapes = stored(case)
    x = torch.randn(5, IN)
    pieces = even_shards(IN, tp)
    shards = [shard_layer(fmt, reader(state), shapes, layer.format_args(), ROW, start, stop, MODULE)
              for start, stop in pieces]
    assert all(local.bias is None and torch.equal(row_bias, state["bias"]) for local, row_bias in shards)
    with torch.no_grad():
        summed = sum(local(x[:, start:stop]) for (local, _), (start, stop) in zip(shards, pieces))
        torch.testing.assert_close(summed + state["bias"], layer(x), rtol=1e-5, atol=1e-5)


def test_a_row_shard_of_a_layer_without_bias_has_none_to_add():
    fmt, layer, state, shapes = stored("int4 groups", bias=False)
    local, row_bias = shard_layer(fmt, reader(state), shapes, {}, ROW, 64, 128)
    assert row_bias is None and local.bias is None and local.in_features == 64


# Sparse by ROW reads its whole mask and values (the kept values of a column range are spread over
# every row), and by COLUMN the mask rows above the shard: its values are checked alone below.
@pytest.mark.parametrize("dim", [COLUMN, ROW])
@pytest.mark.parametrize("case", [case for case in LAYERS if case != "sparse"])
def test_a_shard_reads_only_its_share(case, dim):
    fmt, layer, state, shapes = stored(case)
    bytes_read = []
    start, stop = even_shards(OUT if dim == COLUMN else IN, 4)[1]
    local, row_bias = shard_layer(fmt, reader(state, bytes_read), shapes, layer.format_args(), dim, start, stop)
    extra = 0 if row_bias is None else row_bias.numel() * row_bias.element_size()
    assert sum(bytes_read) == local.num_bytes() + extra


def test_a_sparse_column_shard_reads_only_its_values():
    fmt, layer, state, shapes = stored("sparse")
    values_read = []
    read = reader(state)

    def read_logging_values(name, index):
        tensor = read(name, index)
        if name == "values":
            values_read.append(tensor.numel())
        return tensor

    local, _ = shard_layer(fmt, read_logging_values, shapes, layer.format_args(), COLUMN, 24, 48)
    assert values_read == [local.values.numel()]
    assert torch.equal(local.dense_weight(), layer.dense_weight()[24:48])


@pytest.mark.parametrize("dim", [COLUMN, ROW])
def test_shards_read_slices_of_a_safetensors_file(tmp_path, dim):
    """Through safe_open(...).get_slice, as an engine reads a checkpoint: the same shards as from memory."""
    layers = {case: stored(case) for case in LAYERS}
    save_file({f"{case}.{name}": t.contiguous() for case, (_, _, state, _) in layers.items()
               for name, t in state.items()}, tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for case, (fmt, layer, state, _) in layers.items():
            def read(name, index, case=case):
                stored_name = f"{case}.{name}"
                return f.get_tensor(stored_name) if index is None else f.get_slice(stored_name)[index]

            shapes = {name: tuple(f.get_slice(f"{case}.{name}").get_shape()) for name in state}
            assert shapes == {name: tuple(t.shape) for name, t in state.items()}
            for start, stop in even_shards(OUT if dim == COLUMN else IN, 2):
                from_disk, _ = shard_layer(fmt, read, shapes, layer.format_args(), dim, start, stop, case)
                in_memory, _ = shard_layer(fmt, reader(state), shapes, layer.format_args(), dim, start, stop, case)
                disk_state, memory_state = from_disk.state_dict(), in_memory.state_dict()
                assert disk_state.keys() == memory_state.keys()
                assert all(torch.equal(disk_state[name], memory_state[name]) for name in disk_state), case


@pytest.mark.parametrize("tp", [2, 4])
def test_w8a8_dynamic_row_shards_need_the_amax_hook(tp):
    fmt, layer, state, shapes = stored("w8a8 dynamic")
    x = torch.randn(5, IN)
    pieces = even_shards(IN, tp)
    shards = [shard_layer(fmt, reader(state), shapes, {}, ROW, start, stop)[0] for start, stop in pieces]

    def summed(forward: str) -> torch.Tensor:
        with torch.no_grad():
            return sum(getattr(local, forward)(x[:, start:stop]) for local, (start, stop) in zip(shards, pieces)) \
                + state["bias"]

    full = layer(x)
    alone = summed("forward")
    # One process stands in for the ranks: every rank's max|x| per token is known up front, and the
    # hook plays all-reduce(MAX) over them.
    rank_amax = [x[:, start:stop].abs().amax(-1, keepdim=True) for start, stop in pieces]
    for local in shards:
        local.amax_reduce = lambda amax: torch.stack([amax, *rank_amax]).amax(0)
    for forward in ("forward", "reference"):  # torch._int_mm and the float64 reference
        torch.testing.assert_close(summed(forward), full, rtol=1e-5, atol=1e-5)
    assert (alone - full).abs().max() > 1e-3  # each shard's own scale rounds differently


@pytest.mark.parametrize("case", ["int8 groups", "int4 groups"])
def test_column_shards_of_q_k_v_still_fuse(case):
    fmt, build = LAYERS[case]
    q, k, v = (build(nn.Linear(IN, out)) for out in (64, 32, 32))
    x = torch.randn(3, IN)
    for rank in range(2):
        parts = []
        for layer in (q, k, v):
            start, stop = even_shards(layer.out_features, 2)[rank]
            state = layer.state_dict()
            shapes = {name: tuple(t.shape) for name, t in state.items()}
            parts.append(shard_layer(fmt, reader(state), shapes, {}, COLUMN, start, stop)[0])
        fused = fuse_rows(parts)
        assert type(fused) is type(q) and fused.out_features == 64
        with torch.no_grad():
            torch.testing.assert_close(fused(x), torch.cat([part(x) for part in parts], -1), rtol=0, atol=0)


@pytest.mark.parametrize("case, start, stop, message", [
    ("int4 groups", 16, 48, "int4_weight_only groups of 32 inputs; the shard of inputs 16..48 would start inside "
                            "group 0; use a tensor_parallel_size whose shards start on a group boundary "
                            r"\(multiples of 32 inputs\)$"),
    ("int4 groups", 32, 80, "80 would end inside group 2"),
    ("int4 per row", 33, 65, "int4_weight_only packs 2 inputs in a byte; .* start inside packed byte 16; .*"
                             "multiples of 2 inputs"),
    ("int3 per row", 32, 36, "int3_weight_only packs 8 inputs in 3 bytes; .* end inside 3-byte pack 4"),
    ("int8 per row", 0, 63, "CPU kernel takes an even number of inputs per scale"),
    ("sparse", 4, 128, "mask bits of 8 inputs in a byte; .* start inside mask byte 0"),
    ("sparse_2of4", 0, 20, "positions of 8 inputs .* end inside positions byte 2"),
    ("low_rank", 64, 64, "the shard of inputs 64..64 is empty"),
    ("w8a8 static", 64, 129, "outside the layer's 128 inputs"),
])
def test_splits_a_format_cannot_take_are_refused_before_any_read(case, start, stop, message):
    fmt, layer, state, shapes = stored(case)
    with pytest.raises(ShardError, match=rf"^{MODULE}: .*{message}"):
        check_shardable(fmt, shapes, layer.format_args(), ROW, start, stop, MODULE)

    def no_read(name, index):
        raise AssertionError("a refused shard reads nothing")

    with pytest.raises(ShardError, match=message):
        shard_layer(fmt, no_read, shapes, layer.format_args(), ROW, start, stop, MODULE)


def test_splits_every_format_takes_pass_and_unknown_formats_are_named():
    for case in LAYERS:
        fmt, layer, _, shapes = stored(case)
        for dim, size in ((COLUMN, OUT), (ROW, IN)):
            for start, stop in even_shards(size, 4):
                check_shardable(fmt, shapes, layer.format_args(), dim, start, stop, MODULE)
    with pytest.raises(ShardError, match=f"{MODULE}: .*'fp4'.*known: int2_weight_only"):
        check_shardable("fp4", {}, {}, ROW, 0, 8, MODULE)
    with pytest.raises(ShardError, match=f"{MODULE}: stored buffers \\['codes', 'scale'\\] .* do not make a low_rank"):
        check_shardable("low_rank", {"codes": (96, 64), "scale": (96, 1)}, {}, COLUMN, 0, 48, MODULE)
