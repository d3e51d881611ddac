"""Quantization primitives and the int8 weight-only linear against their torch references."""
import pytest
import torch
from torch import nn

from kernels.quant import QuantSpec, dequantize, fake_quantize, pack_int4, quantize, unpack_int4
from kernels.quant_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, False), QuantSpec(4, True, "group", 32),
                                  QuantSpec(4, False, "group", 32), QuantSpec(3, True, "tensor"),
                                  QuantSpec(2, False, "channel")])
def test_round_trip_error_is_at_most_half_a_step(spec):
    torch.manual_seed(0)
    weight = torch.randn(24, 64) + 0.3
    q = quantize(weight, spec)
    assert q.codes.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    shape = {"tensor": (1, 1, -1), "channel": (24, 1, -1), "group": (24, -1, spec.group_size)}[spec.granularity]
    worst = (dequantize(q) - weight).reshape(shape).abs().amax(-1)  # per scale
    assert worst.shape == q.scale.shape and (worst <= q.scale / 2 + 1e-6).all()


def test_fake_quantize_rounds_forward_and_passes_gradients_straight_through():
    weight = torch.randn(8, 32, requires_grad=True)
    spec = QuantSpec(4, True, "group", 16)
    out = fake_quantize(weight, spec)
    assert torch.equal(out, dequantize(quantize(weight, spec)))
    out.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


def test_int4_packing_round_trips_two_codes_per_byte():
    codes = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed), codes)
    unsigned = torch.randint(0, 16, (3, 4), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(unsigned), signed=False), unsigned.to(torch.int8))


@pytest.mark.parametrize("bad, match", [(dict(bits=9), "bits"), (dict(bits=1), "bits"),
                                        (dict(granularity="group"), "group_size"),
                                        (dict(granularity="row"), "granularity")])
def test_bad_specs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**bad)


def test_a_group_size_that_does_not_divide_the_row_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(4, 60), QuantSpec(4, True, "group", 32))


# Shapes cover the kernel's 4x4 tiles and their tails: rows of x 2..40, output rows not a multiple
# of 4, groups of 128, 32 and whole rows, and groups whose length is not a multiple of 16 (the
# portable path).
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 20])
@pytest.mark.parametrize("layer_class, in_features, out_features, group_size", [
    (Int8WeightOnlyLinear, 256, 38, None), (Int8WeightOnlyLinear, 256, 40, 128), (Int8WeightOnlyLinear, 72, 9, None),
    (Int4WeightOnlyLinear, 256, 38, 128), (Int4WeightOnlyLinear, 256, 40, 32), (Int4WeightOnlyLinear, 72, 9, 24),
    (Int4WeightOnlyLinear, 256, 12, None)])
def test_weight_only_linear_matches_its_reference(rows, layer_class, in_features, out_features, group_size):
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features)
    layer = layer_class.from_linear(linear, group_size)
    x = torch.randn(2, rows, in_features)
    with torch.no_grad():
        out, reference = layer(x), layer.reference(x)
    assert out.shape == (2, rows, out_features)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)
    near = 0.05 if layer.bits == 8 else 0.5  # and near the float layer it came from
    assert (out - linear(x)).abs().max() < near


def test_int4_layer_stores_an_eighth_of_the_fp32_bytes():
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(256, 64, bias=False), group_size=128)
    assert layer.codes.numel() * layer.codes.element_size() == 256 * 64 * 4 // 8


def test_weight_only_linears_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="does not fit"):
        Int8WeightOnlyLinear(torch.zeros(4, 30, dtype=torch.int8), torch.ones(4, 4))
    with pytest.raises(ValueError, match="uint8"):
        Int4WeightOnlyLinear(torch.zeros(4, 30, dtype=torch.int8), torch.ones(4, 1))


def test_weight_only_layers_fuse_by_rows_only_with_one_group_size_and_bias():
    parts = [Int4WeightOnlyLinear.from_linear(nn.Linear(64, n), 32) for n in (8, 4)]
    fused = Int4WeightOnlyLinear.concat_rows(parts)
    assert torch.equal(fused.dense_weight(), torch.cat([p.dense_weight() for p in parts]))
    assert torch.equal(fused.bias, torch.cat([p.bias for p in parts]))
    other_groups = Int4WeightOnlyLinear.from_linear(nn.Linear(64, 4), 16)
    no_bias = Int4WeightOnlyLinear.from_linear(nn.Linear(64, 4, bias=False), 32)
    assert Int4WeightOnlyLinear.concat_rows([parts[0], other_groups]) is None
    assert Int4WeightOnlyLinear.concat_rows([parts[0], no_bias]) is None
