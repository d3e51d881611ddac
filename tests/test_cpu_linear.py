"""Prepacked linears give what nn.Linear gives, for every batch size the engine produces."""
import pytest
import torch
from torch import nn

from kernels.cpu_linear import FEW_ROWS_PATHS, LAYOUTS, PrepackedLinear, can_prepack, prepack_linears


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_equals_linear(dtype, bias):
    if dtype == torch.bfloat16 and not can_prepack(dtype):
        pytest.skip("this CPU has no bf16 instructions for oneDNN (AVX2 only); bf16 linears stay plain here")
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", FEW_ROWS_PATHS)
@pytest.mark.parametrize("bias", [False, True])
def test_every_few_rows_path_gives_the_same_product(layout, path, bias):
    torch.manual_seed(0)
    linear = nn.Linear(160, 97, bias=bias)  # 97 outputs: a tail after whole tiles of 4 and panels of 16
    packed = PrepackedLinear(linear, layout)
    packed.route_few_rows(path, fewest_packed_rows=9)
    with torch.inference_mode():
        for rows in range(1, 9):  # whole and partial tiles of 4 rows
            x = torch.randn(rows, 160)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(7, 320)[:, ::2]  # rows with a stride: a view, as a slice of a fused output is
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_panels_give_the_product_for_every_tile_height_and_row_block(bias):
    """1-13 rows make every tile height of AVX2 and AVX-512; 300 rows of 1,536 inputs span row
    blocks; rows of x may have a stride between them."""
    torch.manual_seed(0)
    linear = nn.Linear(1536, 50, bias=bias)
    packed = PrepackedLinear(linear, "panels")
    with torch.inference_mode():
        for rows in [*range(1, 14), 32, 64, 300]:
            x = torch.randn(rows, 1536)
            torch.testing.assert_close(packed.packed_forward(x), linear(x), rtol=1e-5, atol=1e-4)
        x = torch.randn(9, 2000)[:, :1536]  # rows 2,000 floats apart
        torch.testing.assert_close(packed.packed_forward(x), linear(x), rtol=1e-5, atol=1e-4)


def test_the_panels_layout_applies_only_where_the_kernel_does():
    assert PrepackedLinear(nn.Linear(64, 8)).layout == "panels"
    assert PrepackedLinear(nn.Linear(72, 8)).layout == "onednn"  # 72 inputs: not whole 16-float vectors
    if can_prepack(torch.bfloat16):
        assert PrepackedLinear(nn.Linear(64, 8).to(torch.bfloat16)).layout == "onednn"
    assert not can_prepack(torch.float16)  # left as plain nn.Linear by prepack_linears
    with pytest.raises(ValueError, match="layout 'mkl'"):
        PrepackedLinear(nn.Linear(64, 8), "mkl")


def test_the_single_row_path_is_chosen_for_every_layer_at_once():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    prepack_linears(model)
    chosen = {(layer.few_rows_path, layer.fewest_packed_rows) for layer in model}
    assert chosen in ({("plain", 4)}, {("packed", 1)})


def test_linears_that_cannot_be_packed_stay_plain():
    model = nn.Sequential(nn.Linear(64, 8).to(torch.float16), nn.Linear(8, 64))
    assert prepack_linears(model, measure_single_row=False) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[1], PrepackedLinear)
