"""The compressed-checkpoint format (kernels.checkpoint) and the engine's weight loader: what is
written reads back bit for bit, and a fused projection loads exactly however its parts are stored."""
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from kernels.checkpoint import COMPRESSION_FILE, FORMATS, read_weights, write_checkpoint
from kernels.compressed import StackedLinear
from kernels.low_rank import LowRankLinear
from kernels.quant_linear import (Int2WeightOnlyLinear, Int3WeightOnlyLinear, Int4WeightOnlyLinear,
                                  Int8WeightOnlyLinear)
from kernels.sparse_linear import SemiStructuredLinear, SparseLinear
from kernels.w8a8_linear import W8A8Linear
from serve_apps.engine.models.llama import LlamaForCausalLM

CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2)


def test_format_names_are_the_ones_checkpoints_on_disk_carry():
    assert FORMATS == {"int8_weight_only": Int8WeightOnlyLinear, "int4_weight_only": Int4WeightOnlyLinear,
                       "int3_weight_only": Int3WeightOnlyLinear, "int2_weight_only": Int2WeightOnlyLinear,
                       "w8a8": W8A8Linear, "low_rank": LowRankLinear, "sparse": SparseLinear,
                       "sparse_2of4": SemiStructuredLinear}


@pytest.fixture
def written(tmp_path):
    tensors = {"model.embed_tokens.weight": torch.randn(10, 64)}
    layers = {"model.layers.0.mlp.up_proj": Int4WeightOnlyLinear.from_linear(nn.Linear(64, 32), 32),
              "model.layers.0.mlp.gate_proj": Int3WeightOnlyLinear.from_linear(nn.Linear(64, 32), 32),
              "model.layers.0.mlp.down_proj": Int2WeightOnlyLinear.from_linear(nn.Linear(32, 64)),
              "lm_head": W8A8Linear.from_linear(nn.Linear(64, 10), torch.tensor([0.05]))}
    write_checkpoint(tmp_path, tensors, layers, {"name": "r"}, [{"step": 0}])
    return tmp_path, tensors, layers


def test_written_weights_read_back_bit_for_bit(written):
    path, tensors, layers = written
    read = dict(read_weights(path))
    assert read.keys() == {*tensors, *layers}
    assert torch.equal(read["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    for name, layer in layers.items():
        assert type(read[name]) is type(layer)
        stored = read[name].state_dict()
        assert stored.keys() == layer.state_dict().keys()
        assert all(torch.equal(stored[key], t) for key, t in layer.state_dict().items())


@pytest.mark.parametrize("edit, message", [({"version": 2}, "version 2 is not 1"),
                                           ({"modules": {"lm_head": {"format": "int5", "args": {}}}},
                                            "unknown compressed format 'int5'")])
def test_another_version_or_an_unknown_format_is_refused(written, edit, message):
    path = written[0]
    manifest = json.loads((path / COMPRESSION_FILE).read_text())
    (path / COMPRESSION_FILE).write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(ValueError, match=message):
        list(read_weights(path))


def _checkpoint(hf_model, compressed: dict[str, nn.Module]):
    """The model's weights as read_weights yields them, with `compressed` in place of those modules."""
    weights = [(name, t) for name, t in hf_model.state_dict().items() if name.rpartition(".")[0] not in compressed]
    return weights + list(compressed.items())


def test_fused_projections_load_exactly_however_their_parts_are_stored():
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).eval()
    attn, mlp = hf.model.layers[0].self_attn, hf.model.layers[0].mlp
    compressed = {"model.layers.0.self_attn.q_proj": Int8WeightOnlyLinear.from_linear(attn.q_proj),
                  "model.layers.0.mlp.gate_proj": Int4WeightOnlyLinear.from_linear(mlp.gate_proj, 32),
                  "model.layers.0.mlp.up_proj": Int4WeightOnlyLinear.from_linear(mlp.up_proj, 32)}
    ours = LlamaForCausalLM(hf.config)
    ours.load_weights(_checkpoint(hf, compressed))
    qkv, gate_up = ours.layers[0].self_attn.qkv_proj, ours.layers[0].mlp.gate_up_proj
    assert isinstance(qkv, StackedLinear)  # int8 q beside plain k and v
    assert isinstance(gate_up, Int4WeightOnlyLinear)  # one group size: one layer
    x = torch.randn(3, 64)
    with torch.no_grad():
        parts = [compressed["model.layers.0.self_attn.q_proj"], attn.k_proj, attn.v_proj]
        assert torch.equal(qkv(x), torch.cat([part(x) for part in parts], -1))
    expected = torch.cat([compressed[f"model.layers.0.mlp.{p}_proj"].dense_weight() for p in ("gate", "up")])
    assert torch.equal(gate_up.dense_weight(), expected)


@pytest.mark.parametrize("compress_q", [False, True])
def test_a_missing_part_of_a_fused_projection_is_named(compress_q):
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).eval()
    q_proj = hf.model.layers[0].self_attn.q_proj
    compressed = {"model.layers.0.self_attn.q_proj": Int8WeightOnlyLinear.from_linear(q_proj)} if compress_q else {}
    weights = [(name, w) for name, w in _checkpoint(hf, compressed) if name != "model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks weights for: layers\.0\.self_attn\.qkv_proj\.weight#1"):
        LlamaForCausalLM(hf.config).load_weights(weights)
