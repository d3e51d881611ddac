"""Structured pruning: a smaller, ordinary HF Llama that round-trips and serves."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from jobs.compress.calibration import collect
from jobs.compress.checkpoint import save_compressed
from jobs.compress.structured import StructuredConfig
from jobs.models.load import load_causal_lm
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine
from serve_apps.engine.sampling_params import SamplingParams


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


IDS = torch.randint(10, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def run(model, **settings):
    step = StructuredConfig(**settings)
    stats = collect(model, step.targets(model), step.stats_needed(), [IDS], progress=False) \
        if step.stats_needed() else None
    return step.apply(model, stats)


@pytest.mark.parametrize("score", ["magnitude", "activation"])
def test_heads_neurons_and_layers_shrink_the_model_and_its_config(model, score):
    run(model, target="heads", fraction=0.25, score=score)
    run(model, target="neurons", fraction=0.5, score=score)
    run(model, target="layers", fraction=0.25, score=score)
    config = model.config
    assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (3, 6, 8)
    assert config.intermediate_size == 48 and config.num_hidden_layers == 3 and len(model.model.layers) == 3
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (48, 64) and layer.self_attn.k_proj.weight.shape == (24, 64)
    assert layer.mlp.down_proj.weight.shape == (64, 48)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_removing_nothing_changes_nothing(model):
    with torch.no_grad():
        before = model(IDS).logits
    for target in ("heads", "neurons", "layers"):
        run(model, target=target, fraction=0.0)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_activation_scores_keep_the_loud_neurons(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:10] *= 50  # neurons 0..9 fire far harder than the rest
    run(model, target="neurons", fraction=0.8, score="activation")
    kept = model.model.layers[0].mlp.up_proj.weight
    assert kept.shape[0] == 19 and (kept.abs().amax(1) > 1).sum() == 10  # all ten loud ones survive


def test_a_pruned_model_round_trips_and_serves(model, tiny_llama_dir, tmp_path):
    run(model, target="heads", fraction=0.5)
    run(model, target="layers", fraction=0.5)
    save_compressed(model, tmp_path / "small", tiny_llama_dir, {"name": "s"}, [])
    reloaded = load_causal_lm(tmp_path / "small")
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.equal(reloaded(IDS).logits, expected)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "small").config.num_hidden_layers == 2
    engine = LLMEngine(tmp_path / "small", EngineConfig(num_blocks=16, block_size=4))
    (out,) = engine.generate([IDS[0].tolist()], SamplingParams(temperature=0, max_tokens=1))
    assert out.token_ids == [expected[0, -1].argmax().item()]


@pytest.mark.parametrize("settings, message", [
    ({"target": "heads", "fraction": 1.0}, "fraction"),
    ({"target": "heads", "fraction": 0.9}, "every one of 4"),
    ({"target": "layers", "fraction": 0.9}, "all 4 layers"),
    ({"target": "neurons", "fraction": 0.5, "modules": ["*.mlp.*"]}, "every decoder layer alike"),
])
def test_bad_structured_settings_are_refused(model, settings, message):
    with pytest.raises(ValueError, match=message):
        StructuredConfig(**settings).check(model)
