"""The engine on tiny random models: exactly what transformers' greedy `generate` produces,
whatever the batching: alone, all at once, staggered, chunked, from the prefix cache, preempted."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine
from serve_apps.engine.sampling_params import SamplingParams

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              eos_token_id=VOCAB - 1, bos_token_id=0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    # a window of 11 tokens: shorter than most prompts, ending mid-block for every block size here
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=11, query_pre_attn_scalar=24,
                                       layer_types=["sliding_attention", "full_attention"],
                                       hidden_activation="gelu_pytorch_tanh"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_model(request, tmp_path_factory, smollm2_dir):
    """A random model of each family, saved as a HF folder (SmolLM2's tokenizer files, unused)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param]())
    with torch.no_grad():  # sharpen the random logits so greedy choices are far from ties
        model.get_output_embeddings().weight.mul_(4)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and request.param == "gemma3":
                param.normal_(0, 0.5)  # Gemma's norms start at 0 (a factor of 1): make them matter
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((smollm2_dir / name).read_bytes())
    return path


def prompts(n, seed=0, shared_prefix=40):
    rng = random.Random(seed)
    prefix = [rng.randrange(1, VOCAB - 1) for _ in range(shared_prefix)]
    out = []
    for i in range(n):
        body = [rng.randrange(1, VOCAB - 1) for _ in range(rng.randrange(3, 60))]
        out.append(prefix + body if i % 2 else body)
    return out


def hf_greedy(path, prompt_list, max_tokens):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    outputs = []
    for ids in prompt_list:
        generated = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        outputs.append(generated[0, len(ids):].tolist())
    return outputs


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("engine_config", [
    EngineConfig(num_blocks=256, block_size=8),
    EngineConfig(num_blocks=256, block_size=4, max_num_batched_tokens=16),  # chunked prefill
    EngineConfig(num_blocks=24, block_size=8, max_num_batched_tokens=64),  # forced preemption
], ids=["batched", "chunked", "preempting"])
def test_greedy_equals_transformers(tiny_model, engine_config):
    prompt_list = prompts(10)
    expected = hf_greedy(tiny_model, prompt_list, GREEDY.max_tokens)
    engine = LLMEngine(tiny_model, engine_config)
    assert [o.token_ids for o in engine.generate(prompt_list, GREEDY)] == expected
    # again: now every shared prefix comes from the cache
    assert [o.token_ids for o in engine.generate(prompt_list, GREEDY)] == expected
    assert engine.kv_cache.stats.hit_tokens > 0
    if engine_config.num_blocks == 24:
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache.num_free_blocks == engine_config.num_blocks


def test_staggered_arrivals_and_aborts(tiny_model):
    prompt_list = prompts(8, seed=3)
    expected = hf_greedy(tiny_model, prompt_list, GREEDY.max_tokens)
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=32))
    finished, pending = {}, list(enumerate(prompt_list))
    doomed = engine.add_request(prompt_list[0], GREEDY, request_id="doomed")
    while pending or engine.has_unfinished_requests():
        if pending:
            i, ids = pending.pop(0)
            engine.add_request(ids, GREEDY, request_id=f"p{i}")
        for output in engine.step():
            if output.request_id == doomed and len(output.token_ids) == 3:
                engine.abort(doomed)
            elif output.finished:
                finished[output.request_id] = output.token_ids
    assert [finished[f"p{i}"] for i in range(len(prompt_list))] == expected
    assert "doomed" not in finished
    assert engine.kv_cache.num_free_blocks == 128


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks=128, block_size=4))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=1234, ignore_eos=True)
    alone = engine.generate([prompts(1, seed=5)[0]], seeded)[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    engine.add_request(prompts(3, seed=6)[1], others)
    crowded = engine.generate([prompts(1, seed=5)[0]], seeded)[0].token_ids
    engine.add_request(prompts(3, seed=7)[2], others)
    assert alone == crowded
    other_seed = engine.generate([prompts(1, seed=5)[0]], seeded.model_copy(update={"seed": 99}))[0].token_ids
    assert other_seed != alone


def test_bad_requests_are_refused_before_anything_is_allocated(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks=16, block_size=4))
    with pytest.raises(ValueError, match="prompt: 300 tokens leave no room in the context of 256"):
        engine.add_request(list(range(1, 301)))
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        engine.add_request(list(range(1, 100)))
    with pytest.raises(ValueError, match="prompt: must contain at least one token"):
        engine.add_request([])
    for bad in (-1, VOCAB):
        with pytest.raises(ValueError, match=f"prompt: token id {bad} is outside the vocabulary \\(0 to {VOCAB - 1}\\)"):
            engine.add_request([5, bad, 6])
    assert not engine.has_unfinished_requests() and engine.kv_cache.num_free_blocks == 16


def test_async_streams_match_the_sync_engine_and_cancel_frees_blocks(tiny_model):
    import asyncio

    from serve_apps.engine.async_engine import AsyncLLMEngine

    prompt_list = prompts(6, seed=11)
    expected = hf_greedy(tiny_model, prompt_list, GREEDY.max_tokens)
    engine = AsyncLLMEngine(LLMEngine(tiny_model, EngineConfig(num_blocks=128, block_size=4)))

    async def collect(ids):
        tokens = []
        async for output in engine.generate(ids, GREEDY):
            tokens += output.new_token_ids
        return tokens

    async def cancelled_after_two_tokens():
        seen = 0
        async for _ in engine.generate(prompt_list[0], GREEDY.model_copy(update={"max_tokens": 200})):
            seen += 1
            if seen == 2:
                break  # the consumer goes away, like a disconnected HTTP client

    async def main():
        results = await asyncio.gather(cancelled_after_two_tokens(), *(collect(ids) for ids in prompt_list))
        await asyncio.sleep(0.05)  # the loop applies the abort before its next step
        await engine.shutdown()
        return results[1:]

    assert asyncio.run(main()) == expected
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.kv_cache.num_free_blocks == 128


def test_a_failing_step_ends_every_stream_at_once_and_the_engine_reports_dead(tiny_model, monkeypatch):
    import asyncio

    from serve_apps.engine.async_engine import AsyncLLMEngine
    from serve_apps.engine.errors import EngineDeadError

    engine = AsyncLLMEngine(LLMEngine(tiny_model, EngineConfig(num_blocks=128, block_size=4)))
    # A bug that lets a prompt through unchecked: its token id breaks the model's embedding mid-step.
    monkeypatch.setattr(engine.engine, "_check_prompt", lambda token_ids: None)
    started = asyncio.Event()

    async def consume(ids, max_tokens):
        async for _ in engine.generate(ids, GREEDY.model_copy(update={"max_tokens": max_tokens, "ignore_eos": True})):
            started.set()

    async def main():
        healthy = asyncio.create_task(consume(prompts(1, seed=3)[0], 200))
        await started.wait()
        broken = asyncio.create_task(consume([VOCAB + 5], 4))
        results = await asyncio.wait_for(asyncio.gather(healthy, broken, return_exceptions=True), timeout=60)
        with pytest.raises(EngineDeadError):  # a later request fails at once, never queued
            await consume(prompts(1, seed=4)[0], 4)
        return results

    assert all(isinstance(result, EngineDeadError) for result in asyncio.run(main()))
    with pytest.raises(EngineDeadError):
        engine.check_health()


def test_engine_metrics_use_the_shared_names(tiny_model):
    from cluster import metrics as names

    engine = LLMEngine(tiny_model, EngineConfig(num_blocks=128, block_size=4))
    prompt_list = prompts(4, seed=2)
    engine.generate(prompt_list + prompt_list, GREEDY)
    sink = engine.metrics.sink
    assert len(sink.observations[names.TIME_TO_FIRST_TOKEN.name]) == 8
    assert len(sink.observations[names.INTER_TOKEN_LATENCY.name]) == 8 * (GREEDY.max_tokens - 1)
    assert len(sink.observations[names.QUEUE_TIME.name]) == 8
    assert sink.totals[names.GENERATION_TOKENS.name] == 8 * GREEDY.max_tokens
    assert sink.totals[names.PROMPT_TOKENS.name] == 2 * sum(map(len, prompt_list))
    assert sink.totals[names.PREFIX_CACHE_HITS.name] == engine.kv_cache.stats.hit_tokens > 0
    assert sink.gauges[names.REQUESTS_RUNNING.name] == 0 and sink.gauges[names.KV_CACHE_USAGE.name] == 0


def test_thousand_random_requests_with_aborts_free_every_block(tiny_model):
    rng = random.Random(4)
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks=48, block_size=4, max_num_seqs=16,
                                                max_num_batched_tokens=48))
    shared = [rng.randrange(1, VOCAB - 1) for _ in range(12)]
    live = []
    for i in range(1000):
        prompt = shared[: rng.randrange(0, 13)] + [rng.randrange(1, VOCAB - 1) for _ in range(rng.randrange(1, 24))]
        params = SamplingParams(temperature=rng.choice([0.0, 0.9]), seed=i, max_tokens=rng.randrange(1, 10))
        live.append(engine.add_request(prompt, params))
        if rng.random() < 0.25:
            engine.abort(rng.choice(live))
        for _ in range(rng.randrange(0, 3)):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.num_free_blocks == 48
    assert all(block.ref_count == 0 for block in engine.kv_cache.pool.blocks)
    assert engine.scheduler.num_preemptions > 0 and engine.kv_cache.stats.hit_tokens > 0
    assert not engine.requests and not engine.detokenizers


def test_prompt_logprobs_equal_transformers_across_chunks(tiny_model):
    prompt_list = prompts(3, seed=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    engine = LLMEngine(tiny_model, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=16))
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    engine.generate(prompt_list, GREEDY)  # fill the prefix cache: prompt logprobs must not use it
    for ids, output in zip(prompt_list, engine.generate(prompt_list, params)):
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        assert [p.token_id for p in output.prompt_logprobs] == ids[1:]
        torch.testing.assert_close(torch.tensor([p.logprob for p in output.prompt_logprobs]),
                                   expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
        assert all(len(p.top_logprobs) == 2 for p in output.prompt_logprobs)
