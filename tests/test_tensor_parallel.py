"""Tensor parallelism on tiny random models: the partition rule, the step message, and engines split
over 2 and 4 ranks (threads of this process, real gloo collectives) giving exactly the tokens of
one rank and of transformers, plain and compressed checkpoints alike."""
import random
from types import SimpleNamespace

import pytest
import torch

from checkpoint_helpers import compress_and_save
from kernels.shard import ShardError
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.kv_cache_manager import KVCacheManager
from serve_apps.engine.llm_engine import LLMEngine
from serve_apps.engine.models.tp_layout import LayoutError, rank_shards
from serve_apps.engine.request import Request, Status
from serve_apps.engine.sampling_params import SamplingParams
from serve_apps.engine.scheduler import Scheduler
from serve_apps.engine.step_message import StepMessageBuilder, WorkerRequests
from serve_apps.engine.tp_worker import weight_bytes
from test_engine import GREEDY, hf_greedy, prompts, tiny_model  # noqa: F401 - the fixture, every family

SMOLLM2_SHAPE = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                vocab_size=49152)


def test_attention_splits_by_whole_kv_groups_uneven_allowed():
    shards = rank_shards(SMOLLM2_SHAPE, 2)
    assert [(s.q_heads.start, s.q_heads.stop, s.kv_heads.start, s.kv_heads.stop) for s in shards] == \
        [(0, 6, 0, 2), (6, 9, 2, 3)]
    assert [(s.mlp.size, s.vocab.size) for s in shards] == [(768, 24576)] * 2


def test_past_the_kv_heads_each_is_replicated_over_the_ranks_of_its_group():
    shards = rank_shards(SMOLLM2_SHAPE, 6)
    assert [(s.q_heads.start, s.q_heads.stop) for s in shards] == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 9)]
    assert [s.kv_heads.start for s in shards] == [0, 0, 1, 1, 2, 2]


def test_a_size_that_cannot_split_names_the_sizes_that_can():
    with pytest.raises(LayoutError, match=r"tensor_parallel_size 4: .*3 KV heads.*sizes that work: 1, 2, 3, 6"):
        rank_shards(SMOLLM2_SHAPE, 4)


def test_workers_rebuild_every_step_of_a_random_run_from_the_messages():
    """Arrivals, chunked prefill, preemption and aborts: what a worker rebuilds from each message is
    exactly what rank 0's scheduler decided, and it forgets every request that ended."""
    rng = random.Random(0)
    scheduler = Scheduler(KVCacheManager(16, 4, True), max_num_seqs=8, max_num_batched_tokens=24)
    builder, worker = StepMessageBuilder(), WorkerRequests()
    live, steps, preempted = [], 0, 0
    for step in range(400):
        if rng.random() < 0.5:
            tokens = [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
            request = Request(f"r{step}", tokens, SamplingParams(max_tokens=8, prompt_logprobs=rng.choice([None, 1])))
            scheduler.add(request)
            live.append(request)
        if live and rng.random() < 0.05:
            victim = live.pop(rng.randrange(len(live)))
            scheduler.finish(victim, Status.FINISHED_ABORT)
        out = scheduler.schedule()
        if not out.scheduled:
            continue
        preempted += len(out.preempted)
        items = worker.apply(builder.build(out))
        assert [(i.new_token_ids, i.start, i.num_new_tokens, i.completes_sequence, i.num_prompt_logprob_rows,
                 i.block_ids) for i in items] == \
               [(s.new_token_ids, s.start, s.num_new_tokens, s.completes_sequence, s.num_prompt_logprob_rows,
                 s.block_ids) for s in out.scheduled]
        scheduler.commit(out)
        steps += 1
        for item in out.scheduled:
            request = item.request
            if item.completes_sequence:
                request.token_ids.append(rng.randrange(50))
                if len(request.output_token_ids) >= 8 and request in live:
                    live.remove(request)
                    scheduler.finish(request, Status.FINISHED_LENGTH)
    assert steps > 200 and preempted > 0
    running = {r.request_id for r in scheduler.running}
    assert set(worker.tokens) <= running | {r.request_id for r in scheduler.waiting}


@pytest.mark.parametrize("tp", [2, 4])
def test_greedy_tokens_equal_one_rank_and_transformers(tiny_model, tp):  # noqa: F811
    """4 query / 2 KV heads: tp=2 splits the KV heads, tp=4 replicates each on two ranks. Chunked
    prefill and forced preemption on, prefix hits on the second pass. Sums through shared memory
    (all ranks on one node); the compressed checkpoints below go through gloo."""
    prompt_list = prompts(10)
    expected = hf_greedy(tiny_model, prompt_list, GREEDY.max_tokens)
    config = EngineConfig(num_blocks=24, block_size=8, max_num_batched_tokens=64, tensor_parallel_size=tp)
    engine = LLMEngine(tiny_model, config, tp_workers="threads")
    try:
        assert [o.token_ids for o in engine.generate(prompt_list, GREEDY)] == expected
        assert [o.token_ids for o in engine.generate(prompt_list, GREEDY)] == expected
        assert engine.scheduler.num_preemptions > 0 and engine.kv_cache.stats.hit_tokens > 0
        assert engine.kv_cache.num_free_blocks == 24
    finally:
        engine.shutdown()


RECIPES = {
    "int8": {"name": "int8", "steps": [{"method": "rtn", "bits": 8}]},
    "int4-g32": {"name": "int4", "steps": [{"method": "rtn", "bits": 4, "group_size": 32}]},
    "w8a8-dynamic": {"name": "w8a8", "steps": [{"method": "w8a8", "activations": "dynamic", "exclude": ["lm_head"]}]},
}


@pytest.mark.parametrize("recipe,all_reduce", [("int8", "gloo"), ("int4-g32", "shm"), ("w8a8-dynamic", "gloo"),
                                                ("w8a8-dynamic", "shm")])  # W8A8's max over ranks both ways
def test_compressed_checkpoints_give_the_same_tokens_at_tp2(tiny_llama_dir, tmp_path, recipe, all_reduce):
    _, path = compress_and_save(tiny_llama_dir, RECIPES[recipe], tmp_path / "model")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    prompt_list = [[5, 17, 300, 42, 9], list(range(100, 140)), [7] * 3]
    outputs = {}
    for tp in (1, 2):
        config = EngineConfig(num_blocks=64, block_size=8, tensor_parallel_size=tp, tp_all_reduce=all_reduce)
        engine = LLMEngine(path, config, tp_workers="threads")
        outputs[tp] = engine.generate(prompt_list, params)
        if tp == 2:
            infos = engine.runner.rank_infos()
            whole = weight_bytes(LLMEngine(path, EngineConfig(num_blocks=8)).model)
            assert all(0.4 * whole < info.weight_bytes < 0.6 * whole for info in infos), (whole, infos)
        engine.shutdown()
    assert [o.token_ids for o in outputs[2]] == [o.token_ids for o in outputs[1]]
    for two, one in zip(outputs[2], outputs[1]):
        torch.testing.assert_close([t.logprob for t in two.logprobs], [t.logprob for t in one.logprobs],
                                   atol=1e-4, rtol=0)


def test_a_group_that_would_straddle_two_ranks_is_refused_before_any_worker(tiny_llama_dir, tmp_path):
    """down_proj's 128 inputs in int4 groups of 64: at tp=4 rank 1's inputs 32..64 start mid-group."""
    recipe = {"name": "int4", "steps": [{"method": "rtn", "bits": 4, "group_size": 64, "modules": ["*.down_proj"]}]}
    _, path = compress_and_save(tiny_llama_dir, recipe, tmp_path / "model")
    with pytest.raises(ShardError, match=r"layers.0.mlp.down_proj: int4.* groups of 64 inputs; "
                                         r"the shard of inputs 0..32 would end inside group 0"):
        LLMEngine(path, EngineConfig(num_blocks=8, tensor_parallel_size=4), tp_workers="threads")
