"""Start a training run on Ray Train: checks that need the cluster, then TorchTrainer.fit."""
from __future__ import annotations

import json
import math
import os

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from cluster import auth
from cluster.errors import UserError
from cluster.store import Store, write_bytes_atomic
from jobs.data.prepared import open_dataset
from jobs.data.shards import ray_dataset
from jobs.train.loop import train_worker
from jobs.train.spec import WorkerSpec


def connect(address: str | None, cpus_needed: float) -> None:
    """Join the cluster a `ray job submit` or `rayfoundry up` gave us, or start a private one."""
    if ray.is_initialized():
        return
    if address is None and "RAY_ADDRESS" not in os.environ:
        auth.for_private_cluster()
        # Ray Data's read tasks need a CPU beside the workers' or they wait behind them forever.
        ray.init(address="local", num_cpus=math.ceil(cpus_needed) + 1, include_dashboard=False, log_to_driver=True)
    else:
        if auth.token() and auth.MODE_VARIABLE not in os.environ:
            auth.send_token()  # rayfoundry's clusters want it; one that does not ignores it
        ray.init(address=address, log_to_driver=True)


def cpus_needed(spec: WorkerSpec) -> float:
    return spec.train.workers * spec.train.cpus_per_worker


def check_cluster_fits(spec: WorkerSpec) -> None:
    """Refuse what can never be scheduled; say so when CPUs held by other work (Serve replicas,
    other jobs) make the run wait, since Ray Train would otherwise wait without a word."""
    needed, have = cpus_needed(spec), ray.cluster_resources().get("CPU", 0)
    if needed > have:
        raise UserError(f"train.workers x train.cpus_per_worker = {needed:g} CPUs, but the cluster has {have:g}; "
                        "use fewer workers, a fraction of a CPU each, or add nodes")
    if spec.train.use_gpu and ray.cluster_resources().get("GPU", 0) < spec.train.workers:
        raise UserError(f"train.use_gpu needs {spec.train.workers} GPUs; the cluster has "
                        f"{int(ray.cluster_resources().get('GPU', 0))}")
    free = ray.available_resources().get("CPU", 0)
    if needed > free:
        print(f"note: the workers need {needed:g} CPUs and {free:g} of the cluster's {have:g} are free now; "
              "training starts once other work releases them", flush=True)


def runs_uri(store: Store) -> str:
    return f"{store.uri.rstrip('/')}/runs"


SPEC_FILE = "rayfoundry-spec.json"


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two specs."""
    names = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


def claim_run(spec: WorkerSpec, run_name: str, store: Store, fresh: bool = False) -> None:
    """Ray Train resumes a run whose name it finds in storage from its latest checkpoint. Allow that
    only for the same spec: a run resumed under other settings would report the old run's model as
    the new one's. `fresh`: delete what the store holds of the run and start again."""
    run_dir = f"{store.root}/runs/{run_name}"
    exists = store.fs.get_file_info(run_dir).type != pafs.FileType.NotFound
    if exists and fresh:
        store.fs.delete_dir(run_dir)
    elif exists:
        spec_path = f"{run_dir}/{SPEC_FILE}"
        found = store.fs.get_file_info(spec_path).type != pafs.FileType.NotFound
        saved = json.loads(store.fs.open_input_stream(spec_path).readall()) if found else None
        wanted = spec.model_dump(mode="json")
        if saved != wanted:
            what = f"other settings ({', '.join(_differences(saved, wanted))})" if saved else "unknown settings"
            raise UserError(f"run {run_name!r} in the store was started with {what} and would resume from its "
                            "checkpoints; give another run_name, or force: true to start it afresh")
    write_bytes_atomic(store.fs, f"{run_dir}/{SPEC_FILE}", json.dumps(spec.model_dump(mode="json")).encode())


def fit(spec: WorkerSpec, run_name: str, store: Store, address: str | None = None,
        fresh: bool = False) -> ray.train.Result:
    """Train, resuming the run if the store holds it under the same spec (`fresh`: start it again);
    the result's checkpoint is the last one, its return value rank 0's metric history."""
    connect(address, cpus_needed(spec))
    check_cluster_fits(spec)
    claim_run(spec, run_name, store, fresh)
    # The dashboard's Train view lists a run (its workers, attempts, restarts) only with this on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # Materialized before the workers take their CPUs; a prepared split is small (4 bytes a token).
    dataset = ray_dataset(open_dataset(spec.data, store), "train").materialize()
    settings = spec.train
    trainer = TorchTrainer(
        train_worker, train_loop_config=spec.model_dump(mode="json"), datasets={"train": dataset},
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                               resources_per_worker={"CPU": settings.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=runs_uri(store),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints)),
    )
    return trainer.fit()
