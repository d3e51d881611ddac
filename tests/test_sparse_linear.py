"""Sparse layers: exactly the pruned linear they store, in fewer bytes; checkpoints and fusing exact."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from jobs.compress.prune import MagnitudeConfig
from kernels.checkpoint import format_entry, layer_from_entry
from kernels.sparse_linear import SemiStructuredLinear, SparseLinear, pack_bits, unpack_bits


def pruned_linear(inputs=40, outputs=12, two_of_four=False, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        groups = linear.weight.view(outputs, -1, 4)
        if two_of_four:
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
        else:
            keep = torch.rand_like(groups) > 0.5
        groups.mul_(keep)
        linear.weight[0, :8] = 0  # a row whose first groups are empty
    return linear


def test_bits_pack_and_unpack():
    mask = torch.rand(5, 13) > 0.5
    assert pack_bits(mask).shape == (5, 2) and torch.equal(unpack_bits(pack_bits(mask), 13), mask)


@pytest.mark.parametrize("layer_class, two_of_four", [(SparseLinear, False), (SparseLinear, True),
                                                      (SemiStructuredLinear, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_sparse_layer_is_the_pruned_linear(layer_class, two_of_four, bias):
    linear = pruned_linear(two_of_four=two_of_four, bias=bias)
    layer = layer_class.from_linear(linear)
    assert torch.equal(layer.dense_weight(), linear.weight.detach())
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference(x), rtol=0, atol=0)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)
    dense_bytes = 40 * 12 * 4
    weight_bytes = layer.num_bytes() - (48 if bias else 0)
    assert weight_bytes < 0.6 * dense_bytes
    rebuilt = layer_from_entry(format_entry(layer), layer.state_dict())
    assert torch.equal(rebuilt.dense_weight(), layer.dense_weight())


@pytest.mark.parametrize("layer_class", [SparseLinear, SemiStructuredLinear])
def test_rows_of_sparse_layers_concatenate(layer_class):
    parts = [layer_class.from_linear(pruned_linear(outputs=n, two_of_four=True, seed=n)) for n in (8, 4)]
    fused = layer_class.concat_rows(parts)
    assert torch.equal(fused.dense_weight(), torch.cat([p.dense_weight() for p in parts]))


def test_a_dense_weight_is_not_taken_for_two_of_four():
    with pytest.raises(ValueError, match="not 2:4"):
        SemiStructuredLinear.from_linear(nn.Linear(16, 4))


@pytest.mark.parametrize("pattern, layer_class", [("2:4", SemiStructuredLinear), ("unstructured", SparseLinear)])
def test_pruning_can_store_only_the_kept_weights(tiny_llama_dir, pattern, layer_class):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    sparsity = {} if pattern == "2:4" else {"sparsity": 0.5}
    MagnitudeConfig(pattern=pattern, format="sparse", exclude=["lm_head"], **sparsity).apply(model, None)
    MagnitudeConfig(pattern=pattern, exclude=["lm_head"], **sparsity).apply(reference, None)
    assert isinstance(model.model.layers[0].mlp.down_proj, layer_class)
    ids = torch.randint(100, 5000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
