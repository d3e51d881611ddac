"""GPTQ: exact where it should equal round-to-nearest, clearly better where inputs correlate."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.compress.calibration import collect
from jobs.compress.gptq import GPTQConfig, gptq_quantize
from jobs.compress.recipe import Recipe
from jobs.compress.weight_only import WeightOnlyConfig
from kernels.quant import QuantSpec, dequantize, quantize
from kernels.quant_linear import Int4WeightOnlyLinear


@pytest.fixture(scope="module")
def correlated():
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    mixing = torch.randn(128, 128) * (torch.rand(128) * 3)[None]  # correlated inputs of uneven size
    x = torch.randn(4096, 128) @ mixing
    return weight, x, x.T @ x / x.shape[0]


def output_error(x, weight, approx) -> float:
    return ((x @ (weight - approx).T) ** 2).mean().item()


def test_with_an_identity_hessian_gptq_is_round_to_nearest(correlated):
    weight, _, _ = correlated
    spec = QuantSpec(4, True, "group", 32)
    assert torch.equal(gptq_quantize(weight, torch.eye(128), spec).codes, quantize(weight, spec).codes)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "group", 32), QuantSpec(4, True), QuantSpec(3, True),
                                  QuantSpec(4, False, "group", 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_moves_outputs_less_than_round_to_nearest(correlated, spec, act_order):
    weight, x, hessian = correlated
    gptq = dequantize(gptq_quantize(weight, hessian, spec, act_order=act_order, block_size=32))
    rtn = dequantize(quantize(weight, spec))
    assert output_error(x, weight, gptq) < 0.7 * output_error(x, weight, rtn)


def test_a_dead_input_is_zeroed_and_the_rest_quantized(correlated):
    weight, x, _ = correlated
    x = x.clone()
    x[:, 5] = 0
    q = gptq_quantize(weight, x.T @ x / x.shape[0], QuantSpec(8, True))
    assert (q.codes[:, 5] == 0).all() and torch.isfinite(q.scale).all()


def test_the_gptq_step_beats_rtn_on_a_model(tiny_llama_dir):
    torch.manual_seed(0)
    batches = [torch.randint(100, 5000, (2, 32)) for _ in range(4)]
    ids = torch.randint(100, 5000, (2, 32))

    def logits_error(step):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        with torch.no_grad():
            before = model(ids).logits
        stats = collect(model, step.targets(model), step.stats_needed(), batches, progress=False) \
            if step.stats_needed() else None
        step.apply(model, stats)
        assert isinstance(model.model.layers[1].mlp.down_proj, Int4WeightOnlyLinear)
        with torch.no_grad():
            return (model(ids).logits - before).square().mean().item()

    common = {"bits": 4, "group_size": 32, "exclude": ["lm_head"]}
    assert logits_error(GPTQConfig(**common)) < logits_error(WeightOnlyConfig(**common))


@pytest.mark.parametrize("step, message", [
    ({"method": "gptq", "bits": 4, "damp": 1.5}, "damp"),
    ({"method": "gptq", "bits": 4, "block_size": 0}, "block_size"),
    ({"method": "gptq", "bits": 6}, "bits"),
    ({"method": "gptq", "act_order": True, "order": "random"}, "order"),
])
def test_bad_gptq_settings_are_refused(step, message):
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate({"name": "r", "calibration": {"data": "d"}, "steps": [step]})
