"""The scheduler alone: chunked prefill, budgets, FCFS, preemption, no deadlock, no leak.

Each step's "model" appends a token id to every request whose tokens were all computed, which
is all the scheduler can see of a model.
"""
import random

from serve_apps.engine.kv_cache_manager import KVCacheManager
from serve_apps.engine.request import Request, Status
from serve_apps.engine.sampling_params import SamplingParams
from serve_apps.engine.scheduler import Scheduler


def make_scheduler(num_blocks=32, block_size=4, max_num_seqs=8, budget=16):
    return Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs, budget)


def run_step(scheduler, finished, next_token=7):
    out = scheduler.schedule()
    sampled = [s.request for s in out.scheduled if s.completes_sequence]
    scheduler.commit(out)
    for request in sampled:
        request.token_ids.append(next_token)
        if len(request.output_token_ids) >= request.params.max_tokens:
            scheduler.finish(request, Status.FINISHED_LENGTH)
            finished.append(request)
    return out


def request(rid, prompt_len, max_tokens=4, first=0):
    return Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens))


def test_long_prompt_is_prefilled_in_chunks_beside_decodes():
    scheduler = make_scheduler(budget=16)
    scheduler.add(request("short", 3, max_tokens=10))
    run_step(scheduler, [])  # short: prefill, samples its first token
    scheduler.add(request("long", 40, first=100))
    out = run_step(scheduler, [])
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("short", 1), ("long", 15)]
    out = run_step(scheduler, [])
    assert [s.num_new_tokens for s in out.scheduled] == [1, 15]
    out = run_step(scheduler, [])
    assert [s.num_new_tokens for s in out.scheduled] == [1, 10] and out.scheduled[1].completes_sequence


def test_prefix_hits_start_requests_part_computed():
    scheduler = make_scheduler()
    finished = []
    scheduler.add(request("a", 13))
    while scheduler.has_unfinished():
        run_step(scheduler, finished)
    scheduler.add(request("b", 13))
    out = run_step(scheduler, finished)
    assert out.scheduled[0].num_new_tokens == 1  # 12 of 13 tokens came from the cache
    assert scheduler.kv.stats.hit_tokens == 12 and scheduler.kv.stats.queried_tokens == 26


def test_preemption_by_recompute_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64)
    finished = []
    for i in range(3):
        scheduler.add(request(f"r{i}", 7, max_tokens=6, first=10 * i))
    while scheduler.has_unfinished():
        run_step(scheduler, finished)
    assert scheduler.num_preemptions > 0
    assert sorted(r.request_id for r in finished) == ["r0", "r1", "r2"]
    assert all(len(r.output_token_ids) == 6 for r in finished)
    assert scheduler.kv.num_free_blocks == 6


def test_random_load_with_aborts_never_deadlocks_or_leaks():
    rng = random.Random(1)
    scheduler = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=6, budget=24)
    finished, live = [], []
    for i in range(1000):
        prompt = [rng.randrange(3)] * rng.randrange(1, 4) + [rng.randrange(100) for _ in range(rng.randrange(1, 30))]
        r = Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 12)))
        scheduler.add(r)
        live.append(r)
        if rng.random() < 0.2:
            victim = rng.choice(live)
            if not victim.status.is_finished:
                scheduler.finish(victim, Status.FINISHED_ABORT)
        for _ in range(rng.randrange(0, 3)):
            run_step(scheduler, finished)
    for _ in range(100_000):
        if not scheduler.has_unfinished():
            break
        run_step(scheduler, finished)
    assert not scheduler.has_unfinished()
    assert all(r.status.is_finished for r in live)
    assert scheduler.kv.num_free_blocks == 40
    assert all(b.ref_count == 0 for b in scheduler.kv.pool.blocks)
