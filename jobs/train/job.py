"""What the training jobs (QAT, distillation) share around their own steps: the settings of a run
that ends in a stored model, the checks before any worker starts, the run itself (fit, then the
trained model out of the last checkpoint for the job to keep) and the `--config` entry point."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import Field

from cluster.config import StrictConfig, load_config
from cluster.errors import reports_user_errors
from cluster.store import Store
from jobs.compress.pipeline import check_out_free
from jobs.data.prepared import open_dataset
from jobs.train.checkpoints import trained_model
from jobs.train.config import TrainConfig
from jobs.train.run import fit
from jobs.train.spec import WorkerSpec


class TrainingJobConfig(StrictConfig):
    """What every training job is given besides its models and objective; `out` is what it stores."""

    data: str = "shakespeare"
    out: str = Field(description="model store name or URI of the trained model")
    force: bool = Field(False, description="replace an existing `out` and start the training afresh")
    train: TrainConfig = Field(default_factory=TrainConfig)
    run_name: str | None = Field(None, description="Ray Train run name (default: <job>-<out>); reused, it resumes")
    store: str | None = None
    ray_address: str | None = None

    def run_name_for(self, job: str) -> str:
        return self.run_name or f"{job}-{Path(self.out).name}"


Config = TypeVar("Config", bound=TrainingJobConfig)


def check_data_and_out(config: TrainingJobConfig, store: Store) -> None:
    """Before any worker starts: the data is prepared, and `out` is free unless `force`."""
    open_dataset(config.data, store)
    check_out_free(config.out, store, config.force)


def train_and_keep(config: TrainingJobConfig, spec: WorkerSpec, run_name: str, store: Store,
                   keep: Callable[[Path], dict]) -> tuple[dict, list[dict]]:
    """Fit `spec`, hand `keep` a local copy of the trained model (removed afterwards); returns what
    `keep` returned and the run's metric history."""
    result = fit(spec, run_name, store, config.ray_address, fresh=config.force)
    with trained_model(result.checkpoint) as folder:
        kept = keep(folder)
    return kept, result.return_value or []


def training_job_main(job: str, config_type: type[Config], run: Callable[[Config], dict],
                      doc: str) -> Callable[[list[str] | None], int]:
    """The `main` of `python -m jobs.<job> --config YAML`: runs the job and prints its summary as JSON;
    `doc` is the job module's docstring."""
    prog = f"python -m jobs.{job}"

    @reports_user_errors(prog)
    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
        parser.add_argument("--config", required=True, help=f"the job's YAML (see configs/jobs/{job}.yaml)")
        summary = run(load_config(config_type, parser.parse_args(argv).config))
        print(json.dumps(summary, indent=2))
        return 0

    return main
