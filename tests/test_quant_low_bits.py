"""Int3 and int2 weights: exact packing, layers equal to their reference, checkpoints that reload and
serve, and GPTQ that keeps an earlier pruning step's zeros when asked."""
import copy

import pytest
import torch
import torch.nn.functional as F
from checkpoint_helpers import compress_and_save, logits
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from jobs.compress.checkpoint import export_dense, save_compressed
from jobs.compress.gptq import GPTQConfig, gptq_quantize
from jobs.compress.prune import MagnitudeConfig
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.compress.weight_only import WeightOnlyConfig
from jobs.models.load import load_causal_lm
from kernels.compressed import fuse_rows
from kernels.quant import (
    QuantSpec,
    dequantize,
    pack_int2,
    pack_int3,
    quantize,
    unpack_int2,
    unpack_int3,
)
from kernels.quant_linear import Int2WeightOnlyLinear, Int3WeightOnlyLinear
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine
from serve_apps.engine.sampling_params import SamplingParams

PACKING = {2: (pack_int2, unpack_int2), 3: (pack_int3, unpack_int3)}
BYTES_PER_INPUT = {2: 1 / 4, 3: 3 / 8}
LAYER_CLASSES = {2: Int2WeightOnlyLinear, 3: Int3WeightOnlyLinear}


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 24), (1, 8)])
def test_packing_round_trips_every_code(bits, shape):
    pack, unpack = PACKING[bits]
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    packed = pack(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], int(shape[-1] * BYTES_PER_INPUT[bits]))
    assert torch.equal(unpack(packed), codes)
    unsigned = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    assert torch.equal(unpack(pack(unsigned), signed=False), unsigned.to(torch.int8))


def test_packed_bytes_have_a_fixed_layout():
    # Checkpoints on disk depend on it: the first code in the lowest bits; int3 as a little-endian
    # 24-bit word per eight codes.
    assert pack_int2(torch.tensor([[1, -1, -2, 0]], dtype=torch.int8)).tolist() == [[0b00_10_11_01]]
    word = sum(field << (3 * i) for i, field in enumerate([1, 2, 3, 7, 4, 0, 6, 5]))
    packed = pack_int3(torch.tensor([[1, 2, 3, -1, -4, 0, -2, -3]], dtype=torch.int8))
    assert packed.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


@pytest.mark.parametrize("call, message", [
    (lambda: pack_int2(torch.zeros(3, 6, dtype=torch.int8)), "int2 packing needs a last dimension divisible by 4"),
    (lambda: pack_int3(torch.zeros(3, 12, dtype=torch.int8)), "int3 packing needs a last dimension divisible by 8"),
    (lambda: unpack_int3(torch.zeros(3, 4, dtype=torch.uint8)), "int3 unpacking .* divisible by 3"),
])
def test_rows_that_do_not_fill_whole_packs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("rows", [1, 5, 80])  # decode sizes too: no kernel of their own to take
def test_low_bit_layers_are_dequantize_then_linear(bits, group_size, rows):
    linear = nn.Linear(96, 20)
    layer = LAYER_CLASSES[bits].from_linear(linear, group_size)
    spec = QuantSpec(bits, True, "group" if group_size else "channel", group_size)
    expected_weight = dequantize(quantize(linear.weight, spec))
    assert torch.equal(layer.dense_weight(), expected_weight)
    assert layer.codes.numel() == 20 * 96 * BYTES_PER_INPUT[bits]
    x = torch.randn(2, rows, 96)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, expected_weight, linear.bias))


def test_low_bit_layers_refuse_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="divisible by 8"):
        Int3WeightOnlyLinear.from_linear(nn.Linear(12, 4))
    with pytest.raises(ValueError, match="3 bytes per 8 inputs"):
        Int3WeightOnlyLinear(torch.zeros(4, 5, dtype=torch.uint8), torch.ones(4, 1))
    with pytest.raises(ValueError, match="uint8"):
        Int2WeightOnlyLinear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1))


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_layers_fuse_by_rows(bits):
    parts = [LAYER_CLASSES[bits].from_linear(nn.Linear(64, n), 32) for n in (16, 8, 8)]  # q, k, v
    fused = fuse_rows(parts)
    assert type(fused) is LAYER_CLASSES[bits]
    assert torch.equal(fused.dense_weight(), torch.cat([p.dense_weight() for p in parts]))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


@pytest.mark.parametrize("step", [WeightOnlyConfig(bits=3), GPTQConfig(bits=3)])
def test_int3_refuses_a_layer_whose_inputs_are_not_a_multiple_of_8(step):
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match=r"2's 12 inputs are not a multiple of 8; give it other bits under "
                                         r"`overrides`"):
        step.check(model)
    WeightOnlyConfig(bits=3, overrides=[{"modules": ["2"], "bits": 4}]).apply(model, None)
    assert isinstance(model[0], Int3WeightOnlyLinear)


# int2 for attention (q/k/v fuse into one layer in the engine), int3 g32 for the MLP.
RECIPE = {
    "name": "low-bits",
    "steps": [
        {"method": "rtn", "bits": 2, "modules": ["*.self_attn.*"]},
        {"method": "rtn", "bits": 3, "group_size": 32, "modules": ["*.mlp.*"]},
    ],
}


@pytest.fixture(scope="module")
def low_bit_checkpoint(tiny_llama_dir, tmp_path_factory):
    return compress_and_save(tiny_llama_dir, RECIPE, tmp_path_factory.mktemp("low-bits") / "model")


def test_a_low_bit_checkpoint_reloads_bit_identical(low_bit_checkpoint):
    model, path = low_bit_checkpoint
    reloaded = load_causal_lm(path)
    assert isinstance(reloaded.model.layers[0].self_attn.k_proj, Int2WeightOnlyLinear)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, Int3WeightOnlyLinear)
    assert torch.equal(logits(reloaded), logits(model))
    stored = load_file(path / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.codes"].shape == (64, 128 * 3 // 8)
    assert stored["model.layers.0.self_attn.q_proj.codes"].shape == (64, 64 // 4)


def test_a_low_bit_checkpoint_exports_dense(low_bit_checkpoint, tmp_path):
    model, path = low_bit_checkpoint
    export_dense(path, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(logits(dense), logits(model), atol=1e-4, rtol=0)


def test_the_engine_serves_an_int3_checkpoint_as_transformers_does(tiny_llama_dir, tmp_path):
    recipe = {"name": "int3", "steps": [{"method": "rtn", "bits": 3, "group_size": 32, "exclude": ["lm_head"]}]}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    save_compressed(model, tmp_path, tiny_llama_dir, recipe,
                    apply_recipe(model, Recipe.model_validate(recipe), None, progress=False))
    prompts = [[5, 17, 300, 42, 9, 1000, 77, 3], [64, 8, 2000, 11], [123, 456, 789, 1011, 1213, 1415, 1617]]
    reloaded = load_causal_lm(tmp_path)
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = reloaded.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
            expected.append(out[0, len(ids):].tolist())
    engine = LLMEngine(tmp_path, EngineConfig(num_blocks=32, block_size=4))
    assert isinstance(engine.model.layers[0].self_attn.qkv_proj, Int3WeightOnlyLinear)  # q, k, v fused
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == expected


@pytest.mark.parametrize("keep_zeros", [True, False])
def test_gptq_keep_zeros_keeps_pruned_weights_zero_and_still_compensates(keep_zeros):
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    weight *= weight.abs() > weight.abs().median()  # half pruned
    x = torch.randn(4096, 128) @ (torch.randn(128, 128) * (torch.rand(128) * 3)[None])  # correlated inputs
    spec = QuantSpec(3, True, "group", 32)
    q = gptq_quantize(weight, x.T @ x / x.shape[0], spec, keep_zeros=keep_zeros)
    pruned_codes = q.codes[weight == 0]
    if keep_zeros:
        assert (pruned_codes == 0).all()
    else:  # error compensation refills some of them
        assert (pruned_codes != 0).float().mean() > 0.1
    output_error = ((x @ (weight - dequantize(q)).T) ** 2).mean()
    rtn_error = ((x @ (weight - dequantize(quantize(weight, spec))).T) ** 2).mean()
    assert output_error < 0.9 * rtn_error


@pytest.mark.parametrize("bits, keep_zeros", [(3, True), (3, False), (2, True)])
def test_gptq_after_pruning_in_a_recipe_keeps_the_zeros_when_asked(tiny_llama_dir, bits, keep_zeros):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    pruned, prune = copy.deepcopy(model), MagnitudeConfig(sparsity=0.5, exclude=["lm_head"])
    prune.apply(pruned, None)  # the same pruning as the recipe's first step: where its zeros are
    zeros = {name: linear.weight == 0 for name, linear in prune.targets(pruned).items()}
    recipe = Recipe.model_validate({
        "name": "prune-then-gptq", "calibration": {"data": "unused", "samples": 8, "seq_len": 32},
        "steps": [{"method": "magnitude", "sparsity": 0.5, "exclude": ["lm_head"]},
                  {"method": "gptq", "bits": bits, "group_size": 32, "keep_zeros": keep_zeros, "exclude": ["lm_head"]}],
    })
    apply_recipe(model, recipe, torch.randint(100, 5000, (8 * 32,)), progress=False)
    num_still_zero = num_pruned = 0
    for name, was_zero in zeros.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LAYER_CLASSES[bits])
        num_still_zero += (layer.dense_weight()[was_zero] == 0).sum().item()
        num_pruned += was_zero.sum().item()
    assert num_pruned == sum(z.numel() for z in zeros.values()) // 2
    # The tiny model's inputs are nearly uncorrelated, so GPTQ moves pruned weights little and most
    # round back to 0 anyway; without keep_zeros a few hundred do not.
    assert (num_still_zero == num_pruned) == keep_zeros
