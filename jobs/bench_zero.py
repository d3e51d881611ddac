"""Per-worker memory under DeepSpeed ZeRO stages, measured in one run.

    python -m jobs.bench_zero --config configs/jobs/bench_zero.yaml

Trains the same model for a few steps at each ZeRO stage and precision on the same workers and
reports, for the worst worker, the bytes of the parameter and optimizer-state tensors it holds
(jobs.train.memory), and the ratio to the first stage listed at the same precision. Per parameter,
ZeRO-0 keeps the weight (4 bytes in fp32; 2 in bf16, plus a 4-byte fp32 master) and Adam's moments
(8); ZeRO-3 divides all of it by the W workers but keeps its own fp32 master beside the weight's
partition even when training in fp32, so it holds 16 / (12 W) of ZeRO-0 in fp32 (2/3 at W = 2)
and 1 / W in bf16.
Prints the table; stores Parquet, Markdown and a PNG.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Literal

from pydantic import Field

from cluster.config import StrictConfig, load_config
from cluster.errors import reports_user_errors
from cluster.store import Store
from jobs.bench.report import markdown_table, png_figure, store_results
from jobs.models.load import model_dir
from jobs.train.config import TrainConfig, ZeroConfig
from jobs.train.losses import LossConfig
from jobs.train.run import fit
from jobs.train.spec import WorkerSpec


class BenchZeroConfig(StrictConfig):
    model: str = "smollm2-135m-instruct"
    data: str = "shakespeare"
    stages: list[int] = Field(default_factory=lambda: [0, 3], min_length=1)
    precisions: list[Literal["fp32", "bf16"]] = Field(default_factory=lambda: ["fp32", "bf16"], min_length=1)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2, eval_every=2, eval_tokens=1024,
                                                                   checkpoint_every=2))
    store: str | None = None
    ray_address: str | None = None


def measure_stage(config: BenchZeroConfig, stage: int, store: Store, precision: str = "fp32") -> dict:
    zero = ZeroConfig(**{**config.train.zero.model_dump(), "stage": stage, "precision": precision})
    train = config.train.model_copy(update={"zero": zero})
    spec = WorkerSpec(student=config.model, loss=LossConfig(), train=train, data=config.data, store=config.store)
    result = fit(spec, f"bench-zero-{stage}-{precision}-{time.strftime('%Y%m%d-%H%M%S')}", store, config.ray_address)
    last = (result.return_value or [{}])[-1]
    params, optimizer = last["worker_param_bytes"], last["worker_optimizer_bytes"]
    return {"precision": precision, "zero_stage": stage, "workers": train.workers, "param_mib": params / 2**20,
            "optimizer_mib": optimizer / 2**20, "total_mib": (params + optimizer) / 2**20,
            "tokens_per_s": last["tokens_per_s"]}


def plot(rows: list[dict], path, title: str) -> None:
    labels = [f"ZeRO-{r['zero_stage']} {r['precision']}" for r in rows]
    with png_figure(path, (6, 4)) as (_, axis):
        axis.bar(labels, [r["param_mib"] for r in rows], label="parameters")
        axis.bar(labels, [r["optimizer_mib"] for r in rows], bottom=[r["param_mib"] for r in rows],
                 label="optimizer")
        axis.set_ylabel("MiB per worker (worst worker)")
        axis.legend()
        axis.set_title(title)


@reports_user_errors("python -m jobs.bench_zero")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_zero", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    config = load_config(BenchZeroConfig, parser.parse_args(argv).config)
    store = Store(config.store)
    model_dir(config.model, store)  # a bad model name fails before any worker starts
    rows = []
    for precision in config.precisions:
        measured = [measure_stage(config, stage, store, precision) for stage in config.stages]
        for row in measured:
            row["total_ratio"] = row["total_mib"] / measured[0]["total_mib"]
        rows += measured
    table = markdown_table(rows, list(rows[0]))
    print(table)
    title = f"{config.model}: memory per worker, {config.train.workers} workers"
    print(f"results: {store_results('bench-zero', rows, table, title, store, plot=plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
