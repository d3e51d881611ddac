"""SmoothQuant: an exact rescaling that makes int8 activations lose less on outlier channels."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.compress.calibration import collect
from jobs.compress.recipe import Recipe, apply_recipe
from jobs.compress.smooth import SmoothQuantConfig


def make_outlier_model(tiny_llama_dir):
    """The tiny Llama with a few input channels 30x louder than the rest, as trained models have."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 30
    return model


@pytest.fixture
def outlier_model(tiny_llama_dir):
    return make_outlier_model(tiny_llama_dir)


IDS = torch.randint(100, 5000, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_smoothing_alone_changes_nothing_the_model_computes(outlier_model):
    before = logits(outlier_model)
    step = SmoothQuantConfig(alpha=0.5)
    changed = step.apply(outlier_model, collect(outlier_model, step.targets(outlier_model), step.stats_needed(),
                                                [IDS], progress=False))
    assert len(changed) == 2 * 5  # q, k, v, gate, up of two layers
    torch.testing.assert_close(logits(outlier_model), before, rtol=1e-4, atol=1e-4)


def test_smoothing_before_static_w8a8_loses_less(tiny_llama_dir):
    before = logits(make_outlier_model(tiny_llama_dir))
    w8a8 = {"method": "w8a8", "activations": "static", "observer": "minmax", "exclude": ["lm_head"]}

    def error(steps):
        model = make_outlier_model(tiny_llama_dir)
        recipe = Recipe.model_validate({"name": "r", "calibration": {"data": "d", "samples": 2, "seq_len": 24,
                                                                     "batch_size": 2}, "steps": steps})
        apply_recipe(model, recipe, IDS.flatten(), progress=False)
        return (logits(model) - before).square().mean().item()

    assert error([{"method": "smoothquant", "alpha": 0.5}, w8a8]) < 0.7 * error([w8a8])


def test_smoothquant_needs_whole_norm_fed_groups(outlier_model):
    with pytest.raises(ValueError, match="norm-fed group"):
        SmoothQuantConfig(modules=["*.q_proj", "*.down_proj"]).check(outlier_model)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
