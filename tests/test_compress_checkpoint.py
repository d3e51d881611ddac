"""Compressed checkpoints: written, reloaded bit for bit, served by the engine, exported dense."""
import json

import pytest
import torch
from checkpoint_helpers import IDS, compress_and_save, logits
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cluster.store import Store
from jobs.compress.checkpoint import export_dense
from jobs.data.prepared import open_dataset
from jobs.data.shards import read_tokens
from jobs.eval.perplexity import perplexity
from jobs.models.load import load_causal_lm
from kernels.compressed import StackedLinear
from kernels.quant_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine
from serve_apps.engine.sampling_params import SamplingParams

# int8 per channel for attention (q/k/v fuse into one layer in the engine), int4 g32 for the MLP
# but int8 for up_proj (gate/up run side by side), and the tied head quantized too.
RECIPE = {
    "name": "mixed",
    "steps": [
        {"method": "rtn", "bits": 8, "modules": ["*.self_attn.*", "lm_head"]},
        {"method": "rtn", "bits": 4, "group_size": 32, "modules": ["*.mlp.*"],
         "overrides": [{"modules": ["*.up_proj"], "bits": 8, "group_size": None}]},
    ],
}


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, tmp_path_factory):
    return compress_and_save(tiny_llama_dir, RECIPE, tmp_path_factory.mktemp("compressed") / "model")


def test_a_checkpoint_reloads_bit_identical(compressed):
    model, path = compressed
    reloaded = load_causal_lm(path)
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, Int8WeightOnlyLinear)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, Int4WeightOnlyLinear)
    assert isinstance(reloaded.lm_head, Int8WeightOnlyLinear)
    assert torch.equal(logits(reloaded), logits(model))
    stored = load_file(path / "model.safetensors")
    assert stored["model.layers.0.mlp.down_proj.codes"].dtype == torch.uint8  # int4, two per byte
    assert "model.layers.0.mlp.down_proj.weight" not in stored


def test_the_engine_serves_a_checkpoint_with_fused_and_stacked_layers(compressed):
    model, path = compressed
    engine = LLMEngine(path, EngineConfig(num_blocks=32, block_size=4))
    attention, mlp = engine.model.layers[0].self_attn, engine.model.layers[0].mlp
    assert isinstance(attention.qkv_proj, Int8WeightOnlyLinear)  # q, k, v fused into one
    assert isinstance(mlp.gate_up_proj, StackedLinear)  # int4 gate beside int8 up
    ids = IDS[0].tolist()
    (output,) = engine.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    expected = logits(model)[0, :-1].log_softmax(-1).gather(1, IDS[0, 1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([p.logprob for p in output.prompt_logprobs]), expected,
                               atol=1e-4, rtol=0)


def test_a_dense_export_loads_in_plain_transformers(compressed, tmp_path):
    model, path = compressed
    export_dense(path, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not dense.config.tie_word_embeddings  # the quantized head no longer equals the embedding
    torch.testing.assert_close(logits(dense), logits(model), atol=1e-4, rtol=0)


def test_eval_ppl_takes_a_checkpoint_like_any_model(compressed, smollm2_home, capsys):
    from jobs.eval_ppl import main as eval_ppl

    model, path = compressed
    data = smollm2_home / "store" / "datasets" / "shakespeare"
    assert eval_ppl(["--model", str(path), "--data", str(data), "--tokens", "128", "--window", "64"]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens = torch.from_numpy(read_tokens(open_dataset(str(data), Store()), "validation", 128).astype("int64"))
    assert reported["ppl"] == pytest.approx(perplexity(model, tokens, 64).ppl, rel=1e-6)
