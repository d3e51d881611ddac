"""The engine on the real Gemma 3 270M (a second architecture: scaled embeddings, four norms a layer,
per-head q/k norms, sliding-window local layers): greedy tokens and logprobs equal transformers'."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import RAYFOUNDRY, env_with_home, hf_greedy_with_logprobs, run
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine
from serve_apps.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
MAX_TOKENS = 8
LENGTHS = [6, 40, 300, 700, 1100]  # the last two run past the local layers' 512-token window


@pytest.fixture(scope="module")
def gemma3_dir(smollm2_home):
    added = run([*RAYFOUNDRY, "models", "add", "gemma3-270m"], env_with_home(smollm2_home))
    assert added.returncode == 0, added.stderr
    return smollm2_home / "store" / "models" / "gemma3-270m"


@pytest.fixture(scope="module")
def prompt_ids(smollm2_home, smollm2_dir, gemma3_dir):
    """Shakespeare as text, tokenized by Gemma (with its <bos>); even ones share a 300-token start."""
    shard = smollm2_home / "store" / "datasets" / "shakespeare" / "train-00000.parquet"
    stream = np.concatenate(pq.read_table(shard).column("tokens").to_pylist()[:200]).tolist()
    text = AutoTokenizer.from_pretrained(smollm2_dir).decode(stream[:4000])
    ids = AutoTokenizer.from_pretrained(gemma3_dir).encode(text)
    return [ids[:n] if i % 2 == 0 else ids[:1] + ids[2000 : 2000 + n - 1] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def expected(gemma3_dir, prompt_ids):
    return hf_greedy_with_logprobs(gemma3_dir, prompt_ids, MAX_TOKENS)


@pytest.fixture(scope="module")
def engine(gemma3_dir):
    """One engine for the module: loading Gemma's 262k-token vocabulary and packing its weights takes a while."""
    return LLMEngine(gemma3_dir, EngineConfig(num_blocks=300, block_size=16, max_num_batched_tokens=256,
                                              max_model_len=4096))


def test_gemma3_greedy_tokens_and_logprobs_equal_transformers(engine, prompt_ids, expected):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    alone = [engine.generate([ids], params)[0] for ids in prompt_ids[:2]]
    together = engine.generate(prompt_ids, params)  # chunked prefill, prefix hits, all batched
    assert engine.kv_cache.stats.hit_tokens > 0
    for output, (tokens, logprobs) in zip(alone + together, expected[:2] + expected):
        assert output.token_ids == tokens
        np.testing.assert_allclose([s.logprob for s in output.logprobs], logprobs, atol=1e-3)
    assert engine.kv_cache.num_free_blocks == 300


def test_gemma3_text_prompts_start_with_its_bos(engine, gemma3_dir):
    """Text is tokenized as transformers tokenizes it (Gemma reads garbage without its <bos>)."""
    prompt = "The capital of France is"
    assert engine.new_request(prompt).prompt_token_ids[0] == engine.tokenizer.bos_token_id
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(gemma3_dir)(prompt, return_tensors="pt").input_ids
    reference = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == reference[0, ids.shape[1]:].tolist()
