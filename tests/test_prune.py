"""Magnitude and Wanda pruning: the sparsity asked for, the pattern kept, the better choice made."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from jobs.compress.calibration import collect
from jobs.compress.prune import MagnitudeConfig, WandaConfig, n_of_m_mask, unstructured_mask
from jobs.compress.recipe import Recipe


def zero_fraction(linear: nn.Linear) -> float:
    return (linear.weight == 0).float().mean().item()


def test_masks_drop_exactly_the_lowest_scores():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 8.0, 7.0, 6.0]])
    assert unstructured_mask(score, 0.5).tolist() == [[True, False, False, False], [False, True, True, True]]
    assert unstructured_mask(score, 0.5, per_row=True).tolist() == [[True, False, True, False],
                                                                    [False, True, True, False]]
    assert n_of_m_mask(score, 2, 4).tolist() == [[True, False, True, False], [False, True, True, False]]
    assert unstructured_mask(score, 0.0).all()


@pytest.fixture
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def linears(model, step):
    return [m for name, m in step.targets(model).items()]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_reaches_the_sparsity_per_layer_or_over_all(model, scope):
    step = MagnitudeConfig(sparsity=0.3, scope=scope, exclude=["lm_head"])
    step.apply(model, None)
    fractions = [zero_fraction(m) for m in linears(model, step)]
    sizes = [m.weight.numel() for m in linears(model, step)]
    overall = sum(f * n for f, n in zip(fractions, sizes)) / sum(sizes)
    assert overall == pytest.approx(0.3, abs=1e-3)
    if scope == "layer":
        assert all(f == pytest.approx(0.3, abs=1e-3) for f in fractions)
    else:
        assert max(fractions) - min(fractions) > 0.01  # layers give up different shares


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_of_four_holds_in_every_group(model, method):
    step = Recipe.model_validate({"name": "r", "calibration": {"data": "d"},
                                  "steps": [{"method": method, "pattern": "2:4", "exclude": ["lm_head"]}]}).steps[0]
    batches = [torch.randint(100, 5000, (2, 16))]
    stats = collect(model, step.targets(model), step.stats_needed(), batches, progress=False) \
        if step.stats_needed() else None
    step.apply(model, stats)
    for linear in linears(model, step):
        groups = (linear.weight != 0).reshape(linear.out_features, -1, 4).sum(-1)
        assert (groups <= 2).all() and zero_fraction(linear) >= 0.5


def test_wanda_keeps_the_weights_of_loud_inputs():
    linear = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]] * 2))
    loud = torch.tensor([100.0, 1, 100, 1, 100, 1, 100, 1])  # the smaller weights see 100x the input
    from jobs.compress.calibration import InputStats

    WandaConfig(sparsity=0.5).compress_layer("l", linear, InputStats(sq_norm=loud.square()))
    assert (linear.weight[:, 0::2] != 0).all() and (linear.weight[:, 1::2] == 0).all()


def test_wanda_moves_a_model_less_than_magnitude(model, tiny_llama_dir):
    torch.manual_seed(0)
    with torch.no_grad():  # uneven input channels, as trained models have
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(torch.rand(64) * 4)
            layer.post_attention_layernorm.weight.mul_(torch.rand(64) * 4)
    ids = torch.randint(100, 5000, (2, 32))
    batches = [torch.randint(100, 5000, (2, 32)) for _ in range(4)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits

    def error(step):
        model.load_state_dict(state)
        stats = collect(model, step.targets(model), step.stats_needed(), batches, progress=False) \
            if step.stats_needed() else None
        step.apply(model, stats)
        with torch.no_grad():
            return (model(ids).logits - before).square().mean().item()

    assert error(WandaConfig(sparsity=0.5, exclude=["lm_head"])) < error(MagnitudeConfig(sparsity=0.5,
                                                                                       exclude=["lm_head"]))


@pytest.mark.parametrize("step, message", [
    ({"method": "magnitude", "sparsity": 1.0}, "sparsity"),
    ({"method": "magnitude", "sparsity": -0.1}, "sparsity"),
    ({"method": "magnitude"}, "needs a sparsity"),
    ({"method": "wanda", "pattern": "3:2"}, "0 < N < M"),
    ({"method": "magnitude", "pattern": "2:4", "sparsity": 0.3}, "means sparsity 0.5"),
    ({"method": "magnitude", "pattern": "2:4", "scope": "global"}, "scope global"),
])
def test_bad_pruning_settings_are_refused(step, message):
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate({"name": "r", "calibration": {"data": "d"}, "steps": [step]})


def test_n_of_m_needs_inputs_that_split_into_groups(model):
    with pytest.raises(ValueError, match="groups of 5"):
        MagnitudeConfig(pattern="2:5").check(model)
