"""The perplexity function against transformers' own loss, window by window."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jobs.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def transformers_ppl(model, tokens, window):
    """Plain transformers: mean loss per window, weighted by the tokens each window predicts."""
    total, count = 0.0, 0
    with torch.no_grad():
        for piece in torch.split(tokens, window):
            if len(piece) < 2:
                continue
            loss = model(input_ids=piece[None], labels=piece[None]).loss.item()
            total += loss * (len(piece) - 1)
            count += len(piece) - 1
    return math.exp(total / count), count


@pytest.mark.parametrize("num_tokens, window, batch_size", [(256, 32, 4), (250, 32, 3), (97, 64, 1), (65, 32, 8)])
def test_equals_transformers_loss(tiny_model, num_tokens, window, batch_size):
    tokens = torch.randint(0, 97, (num_tokens,), generator=torch.Generator().manual_seed(num_tokens))
    expected, predicted = transformers_ppl(tiny_model, tokens, window)
    result = perplexity(tiny_model, tokens, window=window, batch_size=batch_size)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.predicted == predicted and result.tokens == num_tokens
    assert result.nll == pytest.approx(math.log(result.ppl))


def test_rejects_degenerate_inputs(tiny_model):
    with pytest.raises(ValueError, match="window"):
        perplexity(tiny_model, torch.arange(10), window=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_model, torch.arange(1), window=8)
