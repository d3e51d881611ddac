"""Low-rank layers and the SVD step: the rank energy asks for, exact where it should be."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from jobs.compress.recipe import Recipe
from jobs.compress.svd import SVDConfig, rank_for_energy
from kernels.checkpoint import format_entry, layer_from_entry
from kernels.low_rank import LowRankLinear


def linear_with_spectrum(singular_values: list[float], out: int = 12, inputs: int = 10) -> nn.Linear:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(out, len(singular_values)))
    v, _ = torch.linalg.qr(torch.randn(inputs, len(singular_values)))
    linear = nn.Linear(inputs, out)
    linear.weight.data = (u * torch.tensor(singular_values)) @ v.T
    return linear


def test_rank_for_energy_is_the_smallest_that_reaches_it():
    values = torch.tensor([3.0, 2.0, 1.0, 1.0])  # squares 9, 4, 1, 1 of 15
    assert [rank_for_energy(values, e) for e in (0.5, 0.61, 9 / 15, 13 / 15, 0.9, 1.0)] == [1, 2, 1, 2, 3, 4]


def test_a_low_rank_layer_is_the_truncated_svd():
    linear = linear_with_spectrum([5.0, 3.0, 0.5, 0.1])
    layer = LowRankLinear.from_linear(linear, 2)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), layer.reference(x), rtol=1e-5, atol=1e-5)
    error = torch.linalg.matrix_norm(layer.dense_weight() - linear.weight.detach(), ord=2)
    assert error.item() == pytest.approx(0.5, rel=1e-4)  # Eckart-Young: the first dropped singular value
    assert torch.allclose(LowRankLinear.from_linear(linear, 4).dense_weight(), linear.weight, atol=1e-5)
    assert LowRankLinear.concat_rows([layer, layer]) is None  # a format without row buffers does not fuse
    assert format_entry(layer) == {"format": "low_rank", "args": {}}
    rebuilt = layer_from_entry(format_entry(layer), layer.state_dict())
    assert torch.equal(rebuilt(x), layer(x))


def test_the_step_replaces_only_layers_that_shrink():
    model = nn.Sequential()
    model.add_module("thin", linear_with_spectrum([4.0, 0.01, 0.01, 0.01], out=40, inputs=40))
    model.add_module("full", linear_with_spectrum([1.0] * 8, out=8, inputs=8))
    changed = SVDConfig(energy=0.99).apply(model, None)
    assert changed == ["thin"] and isinstance(model.thin, LowRankLinear) and model.thin.rank == 1
    assert type(model.full) is nn.Linear  # rank 8 of an 8x8 matrix would only grow


def test_the_step_on_a_model_keeps_what_energy_promises(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    changed = SVDConfig(rank=8, exclude=["lm_head"]).apply(model, None)
    assert changed and all(model.get_submodule(name).rank == 8 for name in changed)
    for name in changed:
        kept = torch.linalg.matrix_norm(model.get_submodule(name).dense_weight()) ** 2
        assert kept <= torch.linalg.matrix_norm(weights[name]) ** 2 + 1e-4


@pytest.mark.parametrize("step, message", [
    ({"method": "svd"}, "exactly one"),
    ({"method": "svd", "energy": 0.9, "rank": 4}, "exactly one"),
    ({"method": "svd", "energy": 1.5}, "energy"),
    ({"method": "svd", "rank": 0}, "rank"),
])
def test_bad_svd_settings_are_refused(step, message):
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate({"name": "r", "steps": [step]})
