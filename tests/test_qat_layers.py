"""Fake-quant layers: the rounding QAT trains through is exactly the one the checkpoint gets."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from jobs.compress.fake_quant import check_qat_recipe, prepare_qat, strip_fake_quant
from jobs.compress.recipe import Recipe, apply_recipe
from kernels.compressed import CompressedLinear
from kernels.fake_quant_linear import FakeQuantLinear, fake_quantize_per_token
from kernels.quant import QuantSpec
from kernels.w8a8_linear import quantize_activations

INT4 = {"name": "int4", "steps": [{"method": "rtn", "bits": 4, "group_size": 32, "exclude": ["lm_head"],
                                   "overrides": [{"modules": ["*.down_proj"], "group_size": 64}]}]}
INT4_SPEC = QuantSpec(4, True, "group", 8)
W8A8 = {"name": "w8a8", "steps": [{"method": "w8a8", "activations": "dynamic", "exclude": ["lm_head"]}]}


@pytest.mark.parametrize("recipe", [INT4, W8A8], ids=["int4-rtn", "w8a8-dynamic"])
def test_converted_layers_compute_what_the_fake_quant_model_trained(tiny_llama_dir, recipe):
    recipe = Recipe.model_validate(recipe)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert prepare_qat(model, recipe) == 14  # 7 linears in each of 2 layers
    fake = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    inputs = {name: torch.randn(5, m.in_features) for name, m in fake.items()}
    with torch.no_grad():
        trained_outputs = {name: m(inputs[name]) for name, m in fake.items()}
    assert strip_fake_quant(model) == 14
    apply_recipe(model, recipe, None, progress=False)
    for name, layer in fake.items():
        real = model.get_submodule(name)
        assert isinstance(real, CompressedLinear)
        assert torch.equal(real.dense_weight(), layer.quantized_weight().detach())  # same codes, same scales
        with torch.no_grad():
            torch.testing.assert_close(real(inputs[name]), trained_outputs[name], rtol=1e-4, atol=1e-5)


def test_straight_through_gradients_reach_the_float_weights():
    layer = FakeQuantLinear.from_linear(nn.Linear(32, 8), INT4_SPEC, activation_bits=8)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    # rounding's gradient is taken as 1, so these are the gradients of sum(xq @ Wq^T + b)
    xq, wq = fake_quantize_per_token(x.detach(), 8), layer.quantized_weight().detach()
    torch.testing.assert_close(layer.weight.grad, xq.sum(0).expand(8, 32))
    torch.testing.assert_close(x.grad, wq.sum(0).expand(4, 32))


def test_per_token_fake_quant_matches_the_w8a8_kernels_activation_codes():
    x = torch.randn(6, 40) * torch.rand(6, 1) * 10
    codes, scale = quantize_activations(x, None)
    assert torch.equal(fake_quantize_per_token(x, 8), codes.float() * scale)


def test_the_trained_layer_shares_its_parameters():
    linear = nn.Linear(16, 4)
    layer = FakeQuantLinear.from_linear(linear, INT4_SPEC)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.to_linear().weight is linear.weight


@pytest.mark.parametrize("steps, message", [
    ([{"method": "gptq", "bits": 4}], "no quantization-aware training form"),
    ([{"method": "w8a8", "activations": "static"}], "dynamic w8a8 only"),
    ([{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "rtn", "bits": 8}], "in one step"),
])
def test_recipes_qat_cannot_train_for_are_refused_before_any_change(tiny_llama_dir, steps, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = {n: type(m) for n, m in model.named_modules()}
    recipe = Recipe.model_validate({"name": "r", "steps": steps,
                                    **({"calibration": {"data": "shakespeare"}} if steps[0]["method"] == "gptq"
                                       or steps[0].get("activations") == "static" else {})})
    with pytest.raises(ValueError, match=message):
        check_qat_recipe(model, recipe)
    assert {n: type(m) for n, m in model.named_modules()} == before

