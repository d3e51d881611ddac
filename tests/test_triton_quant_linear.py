"""The Triton weight-only kernels against the torch reference: on a GPU when there is one,
otherwise under Triton's interpreter on CPU, in a fresh process (the interpreter must be chosen
before Triton is first imported; see tests/test_triton_paged_attention.py)."""
import pytest
import torch
from torch import nn

from test_triton_paged_attention import _run_interpreted

pytest.importorskip("triton", reason="Triton is in the test extras: pip install -e '.[test]'")

# (layer, in, out, group size, rows of x, bias): tails in every dimension, groups of 24 and 64
CASES = [("int8", 96, 40, None, 3, True), ("int8", 64, 70, 32, 20, False), ("int4", 96, 40, 24, 1, True),
         ("int4", 128, 66, 64, 17, False), ("int4", 64, 16, None, 5, False)]


def compare(kind: str, inputs: int, outputs: int, group_size, rows: int, bias: bool, device: str) -> float:
    from kernels.quant_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear
    from kernels.triton_quant_linear import weight_only_linear_triton

    torch.manual_seed(inputs + rows)
    layer = (Int8WeightOnlyLinear if kind == "int8" else Int4WeightOnlyLinear).from_linear(
        nn.Linear(inputs, outputs, bias=bias), group_size)
    x = torch.randn(rows, inputs)
    expected = layer.reference(x)
    on = [t.to(device) if t is not None else None for t in (x, layer.codes, layer.scale, layer.bias)]
    out = weight_only_linear_triton(*on, layer.bits).cpu()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    return (out - expected).abs().max().item()


def test_triton_weight_only_matches_the_reference():
    if torch.cuda.is_available():
        for case in CASES:
            compare(*case, "cuda")
        return
    done = _run_interpreted("import sys; sys.path.insert(0, 'tests')\n"
                            "from test_triton_quant_linear import CASES, compare\n"
                            "for case in CASES:\n"
                            "    print(case, 'max difference', compare(*case, 'cpu'))\n")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("max difference") == len(CASES)
