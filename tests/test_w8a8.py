"""W8A8 linear against its reference; dynamic and static activations; calibration observers."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from jobs.compress.calibration import InputStats, collect
from jobs.compress.recipe import Recipe
from jobs.compress.w8a8 import W8A8Config, minmax_scale, percentile_scale
from kernels.checkpoint import format_entry, layer_from_entry
from kernels.quant import log_dequantize, log_quantize
from kernels.w8a8_linear import W8A8Linear


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_matches_its_reference_and_the_float_layer(rows, static, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(1536, 24, bias=bias)
    x = torch.randn(2, rows, 1536)
    layer = W8A8Linear.from_linear(linear, x.abs().max().reshape(1) / 127 if static else None)
    with torch.no_grad():
        out, reference, exact = layer(x), layer.reference(x), linear(x)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)  # integer sums are exact both ways
    assert (out - exact).abs().max() < 0.05 * exact.abs().max()


def test_state_round_trip_and_fused_rows_are_exact():
    parts = [W8A8Linear.from_linear(nn.Linear(64, n)) for n in (8, 4)]
    rebuilt = layer_from_entry(format_entry(parts[0]), parts[0].state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(rebuilt(x), parts[0](x))
    fused = W8A8Linear.concat_rows(parts)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))
    static = W8A8Linear.from_linear(nn.Linear(64, 8), torch.tensor([0.1]))
    assert W8A8Linear.concat_rows([parts[0], static]) is None  # dynamic and static cannot share one layer


def test_observers_pick_the_scales_they_promise():
    samples = torch.cat([torch.linspace(-1, 1, 10001)[:, None], torch.zeros(10001, 1)], 1)
    samples[0, 0] = -50.0  # one outlier
    stats = InputStats(abs_max=samples.abs().amax(0), samples=samples)
    assert minmax_scale(stats).item() == pytest.approx(50 / 127)
    assert percentile_scale(stats, 99.0).item() == pytest.approx(torch.quantile(samples.abs().flatten(), 0.99) / 127)
    assert percentile_scale(stats, 99.0) < minmax_scale(stats) / 10  # the outlier clips instead


# Percentile clipping trades the rarest activations for resolution: on a random model calibrated with
# 48 tokens its error spans 2-10% of the logits' range across seeds, where min-max and dynamic stay near 1%.
@pytest.mark.parametrize("step, tolerance", [
    ({"activations": "dynamic"}, 0.05),
    ({"activations": "static", "observer": "minmax"}, 0.05),
    ({"activations": "static", "observer": "percentile", "percentile": 99.9}, 0.15),
])
def test_the_step_keeps_a_model_close(tiny_llama_dir, step, tolerance):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(100, 5000, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    config = W8A8Config(exclude=["lm_head"], **step)
    stats = collect(model, config.targets(model), config.stats_needed(), [ids], progress=False) \
        if config.stats_needed() else None
    config.apply(model, stats)
    assert isinstance(model.model.layers[0].mlp.up_proj, W8A8Linear)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() < tolerance * before.abs().max()


@pytest.mark.parametrize("step, message", [
    ({"method": "w8a8", "percentile": 0}, "percentile"),
    ({"method": "w8a8", "observer": "minmax"}, "dynamic activations take none"),
    ({"method": "w8a8", "activations": "sometimes"}, "activations"),
])
def test_bad_w8a8_settings_are_refused(step, message):
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate({"name": "r", "calibration": {"data": "d"}, "steps": [step]})


def test_log_quantization_is_finer_near_the_minimum():
    a = torch.linspace(0, 10, 1001)
    logged = log_dequantize(log_quantize(a, 4, 0.0, 10.0), 4, 0.0, 10.0)
    uniform = torch.round(a / 10 * 15) / 15 * 10
    small, large = a < 1, a > 7
    assert (logged - a)[small].abs().max() < (uniform - a)[small].abs().max()
    assert (logged - a)[large].abs().max() > (uniform - a)[large].abs().max()
    assert log_quantize(a, 4, 0.0, 10.0).max() == 15 and log_quantize(a, 4, 0.0, 10.0).min() == 0
