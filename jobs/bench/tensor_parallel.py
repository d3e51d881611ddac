"""Tensor parallelism against one rank on the same cores: tp=N with one thread per rank (ranks 1..
as Ray actors) against tp=1 with N threads, taking turns each round, at each batch size; with the
shared-memory all-reduce and with gloo alone. Each tp row notes the share of its wall time rank 0
spent in collectives and in sending the step's message."""
from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import torch

from cluster import auth
from jobs.bench.measure import Measured
from jobs.bench.ours import run_engine
from jobs.bench.workloads import random_prompts
from serve_apps.engine.config import EngineConfig
from serve_apps.engine.llm_engine import LLMEngine


def _engines(engine_config: EngineConfig, path: Path, tp: int, all_reduces: list[str]) -> dict[str, LLMEngine]:
    engines = {f"rayfoundry tp=1 ({tp} threads)": (LLMEngine(path, engine_config), tp)}
    for all_reduce in all_reduces:
        config = engine_config.model_copy(update={"tensor_parallel_size": tp, "tp_all_reduce": all_reduce,
                                                  "num_cpus_per_worker": 1})
        engines[f"rayfoundry tp={tp} {all_reduce}"] = (LLMEngine(path, config), 1)
    return engines


def _measure(engine: LLMEngine, threads: int, name: str, scenario: str, prompts, max_tokens: int) -> Measured:
    torch.set_num_threads(threads)  # rank 0's threads; a worker actor has its own
    group, runner = engine.model.group, engine.runner
    collective_s, message_s = group.times.seconds, getattr(runner, "message_s", 0.0)
    row = run_engine(engine, name, scenario, prompts, max_tokens)
    if engine.config.tensor_parallel_size > 1:
        collective = (group.times.seconds - collective_s) / row.seconds
        message = (runner.message_s - message_s) / row.seconds
        row = replace(row, note=f"collectives {collective:.1%}, messages {message:.1%} of wall time (rank 0)")
    return row


def run_tensor_parallel(engine_config: EngineConfig, path: Path, vocab: int, tp: int, batches: list[int],
                        all_reduces: list[str], prompt_tokens: int, max_tokens: int, rounds: int,
                        progress) -> list[Measured]:
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:  # a private Ray on this machine's cores: the workers' actors need one
        auth.for_private_cluster()
        ray.init(address="local", num_cpus=tp, include_dashboard=False, log_to_driver=False)
    engines = _engines(engine_config, path, tp, all_reduces)
    rows = []
    try:
        for name, (engine, threads) in engines.items():
            _measure(engine, threads, name, "warm-up", random_prompts(2, 16, vocab, seed=99), 4)
        for turn in range(rounds):
            for batch in batches:
                prompts = random_prompts(batch, prompt_tokens, vocab, seed=batch + 1000 * turn + 17)
                for name, (engine, threads) in engines.items():
                    row = _measure(engine, threads, name, f"tp batch {batch}", prompts, max_tokens)
                    rows.append(progress(replace(row, round=turn), rounds))
    finally:
        for engine, _ in engines.values():
            engine.shutdown()
        if started_ray:
            ray.shutdown()
    return rows


def tensor_parallel_ratios(rows: list[dict], tp: int) -> list[dict]:
    """tp=N ÷ tp=1 output tokens/s per batch size: the median of the rounds' ratios."""
    one = {(r["scenario"], r["round"]): r["tokens_per_s"] for r in rows if r["engine"].startswith("rayfoundry tp=1 (")}
    out = []
    for engine in sorted({r["engine"] for r in rows if r["engine"].startswith(f"rayfoundry tp={tp} ")}):
        for scenario in sorted({r["scenario"] for r in rows if r["engine"] == engine}):
            pairs = [r["tokens_per_s"] / one[(scenario, r["round"])] for r in rows
                     if r["engine"] == engine and r["scenario"] == scenario and (scenario, r["round"]) in one]
            out.append({"scenario": scenario, "measure": "output tokens/s, tp ÷ tp=1", "peer": engine,
                        "ratio": statistics.median(pairs)})
    return out
