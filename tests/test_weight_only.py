"""Round-to-nearest weight-only quantization of a model: what it swaps, what it refuses."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.compress.weight_only import WeightOnlyConfig
from kernels.quant_linear import Int3WeightOnlyLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear


@pytest.fixture
def tiny_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits, group_size, layer_class, tolerance", [(8, None, Int8WeightOnlyLinear, 0.05),
                                                                      (4, 32, Int4WeightOnlyLinear, 0.5),
                                                                      (3, 32, Int3WeightOnlyLinear, 0.5)])
def test_matching_linears_are_swapped_and_outputs_stay_close(tiny_model, bits, group_size, layer_class, tolerance):
    ids = torch.randint(100, 1000, (1, 12))
    before = _logits(tiny_model, ids)
    swapped = WeightOnlyConfig(bits=bits, group_size=group_size, exclude=["lm_head"]).apply(tiny_model, None)
    assert "lm_head" not in swapped and "model.layers.0.self_attn.q_proj" in swapped
    assert all(isinstance(tiny_model.get_submodule(name), layer_class) for name in swapped)
    assert len(swapped) == 2 * 7  # two layers of q, k, v, o, gate, up, down
    assert (_logits(tiny_model, ids) - before).abs().max() < tolerance


def test_bad_configs_change_nothing(tiny_model):
    with pytest.raises(ValueError, match="matches no linear"):
        WeightOnlyConfig(modules=["*.attention.*"]).apply(tiny_model, None)
    with pytest.raises(ValueError, match="does not divide"):
        WeightOnlyConfig(bits=4, group_size=48).apply(tiny_model, None)
    assert not any(isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear)) for m in tiny_model.modules())
    with pytest.raises(ValueError, match="bits"):
        WeightOnlyConfig(bits=5)
    with pytest.raises(ValueError, match="extra"):
        WeightOnlyConfig(granularity="row")
