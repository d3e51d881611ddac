"""Prepacked linears give what nn.Linear gives, for every batch size the engine produces."""
import pytest
import torch
from torch import nn

from kernels.cpu_linear import FEW_ROWS_PATHS, PrepackedLinear, can_prepack, prepack_linears


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_equals_linear(dtype, bias):
    assert can_prepack(dtype)
    torch.manual_seed(0)
    linear = nn.Linear(576, 960, bias=bias).to(dtype)
    packed = PrepackedLinear(linear)
    with torch.inference_mode():
        for rows in (1, 3, 4, 32, 300):  # both sides of the gemv threshold
            x = torch.randn(rows, 576).to(dtype)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-4 if dtype == torch.float32 else 2e-2)
        x = torch.randn(2, 7, 576).to(dtype)  # leading dims are kept
        assert packed(x).shape == (2, 7, 960)


def test_prepack_swaps_every_linear_and_keeps_tied_weights():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10, bias=False))
    model[3].weight = model[0].weight  # tied, as SmolLM2's lm_head and embeddings
    assert prepack_linears(model) == 2
    assert isinstance(model[1], PrepackedLinear) and model[3].weight is model[0].weight
    with torch.inference_mode():
        x = torch.randint(0, 10, (5,))
        reference = model[0](x) @ model[1].weight.T + model[1].bias
        torch.testing.assert_close(model[1](model[0](x)), reference)


@pytest.mark.parametrize("path", FEW_ROWS_PATHS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_few_rows_path_gives_the_same_product(path, bias):
    torch.manual_seed(0)
    linear = nn.Linear(160, 97, bias=bias)  # 97 outputs: a tail after whole tiles of 4
    packed = PrepackedLinear(linear)
    packed.route_few_rows(path, fewest_packed_rows=9)
    with torch.inference_mode():
        for rows in range(1, 9):  # whole and partial tiles of 4 rows
            x = torch.randn(rows, 160)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(7, 320)[:, ::2]  # rows with a stride: a view, as a slice of a fused output is
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_the_streamed_path_applies_only_where_the_kernel_does():
    assert PrepackedLinear(nn.Linear(64, 8)).can_stream()
    assert not PrepackedLinear(nn.Linear(72, 8)).can_stream()  # 72 inputs: not whole 16-float vectors
    assert not PrepackedLinear(nn.Linear(64, 8).to(torch.bfloat16)).can_stream()


def test_the_single_row_path_is_chosen_for_every_layer_at_once():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    prepack_linears(model)
    chosen = {(layer.few_rows_path, layer.fewest_packed_rows) for layer in model}
    assert chosen in ({("plain", 4)}, {("streamed", 4)}, {("packed", 1)})
