"""The serving benchmark: its workloads, and the job end to end on a tiny model (two policies)."""
import sys

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import env_with_home, run
from jobs.bench.serve_workloads import WorkloadConfig, build_sessions, word_list
from jobs.bench_serve import BenchServeConfig


def test_workloads_share_what_they_should(tiny_llama_dir):
    words = word_list(AutoTokenizer.from_pretrained(tiny_llama_dir))
    tenants = build_sessions(WorkloadConfig(requests=40, tenants=3, system_prompt_words=20), words)
    assert len(tenants) == 40 and all(len(session) == 1 for session in tenants)
    assert len({session[0][0]["content"] for session in tenants}) == 3  # three system prompts, reused
    turns = build_sessions(WorkloadConfig(kind="multi_turn", requests=12, turns=3), words)
    assert len(turns) == 4
    for session in turns:  # every turn resends the one before it, then the reply, then a question
        assert all(later[:len(earlier)] == earlier and len(later) == len(earlier) + 2
                   for earlier, later in zip(session, session[1:]))
    assert build_sessions(WorkloadConfig(seed=3), words) == build_sessions(WorkloadConfig(seed=3), words)


def test_one_arrival_process_at_a_time():
    assert BenchServeConfig().concurrency == 16
    assert BenchServeConfig(request_rate=4).concurrency is None  # Poisson replaces the default
    with pytest.raises(ValueError, match="not both"):
        BenchServeConfig(concurrency=8, request_rate=4)
    with pytest.raises(ValueError, match="set concurrency or request_rate"):
        BenchServeConfig(concurrency=None)


def test_bench_serve_compares_policies(tmp_path, tiny_llama_dir):
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"model: {tiny_llama_dir}\npolicies: [kv_aware, round_robin]\nnum_cpus_per_replica: 0.5\n"
        "workload: {requests: 12, tenants: 3, system_prompt_words: 20, question_words: [2, 4]}\n"
        "max_tokens: 4\nconcurrency: 3\nengine: {num_blocks: 64, max_num_batched_tokens: 64}\n")
    home = tmp_path / "home"
    result = run([sys.executable, "-m", "jobs.bench_serve", "--config", str(config)], env_with_home(home))
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (home / "store" / "results").iterdir()
    rows = {r["policy"]: r for r in pq.read_table(results / "results.parquet").to_pylist()}
    assert set(rows) == {"kv_aware", "round_robin"}
    for row in rows.values():
        assert row["ok"] == 12 and row["output_tokens"] == 48 and 0 <= row["prefix_hit_rate"] <= 1
        assert row["ttft_p50_s"] <= row["ttft_p99_s"] and row["e2e_p50_s"] > 0
    assert rows["kv_aware"]["prefix_hit_rate"] > 0  # 3 system prompts over 12 requests: repeats hit
    assert "kv_aware ÷ peer" in result.stdout and (results / "throughput.png").stat().st_size > 1000
