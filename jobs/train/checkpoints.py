"""Training checkpoints: DeepSpeed's full state (every rank's shard) plus the trained model as a plain
Hugging Face folder, handed to Ray Train, which persists them to the run's storage in the model store.

Ray Train registers a checkpoint only once every worker's files are in storage, and a restarted
worker group is given the latest registered one, so a save cut short is never resumed from.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray.train
import torch

DEEPSPEED_DIR, MODEL_DIR, TAG = "deepspeed", "model", "state"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); under ZeRO-3 every rank must call it."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if ray.train.get_context().get_world_rank() == 0 else None
    return engine.module.state_dict() if ray.train.get_context().get_world_rank() == 0 else None


def copy_tokenizer(source: Path, folder: Path) -> None:
    """The tokenizer and generation files of the model at `source`, beside new weights in `folder`."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def write_model(module: torch.nn.Module, state: dict, folder: Path, source: Path) -> None:
    module.save_pretrained(folder, state_dict=state, safe_serialization=True)
    copy_tokenizer(source, folder)


def report_with_checkpoint(engine, metrics: dict, client_state: dict, source: Path) -> None:
    """Save and report; every rank calls it (DeepSpeed's save and Ray Train's report are collective)."""
    with tempfile.TemporaryDirectory(prefix="rayfoundry-ckpt-") as tmp:
        engine.save_checkpoint(str(Path(tmp) / DEEPSPEED_DIR), tag=TAG, client_state=client_state)
        state = full_state_dict(engine)
        if state is not None:
            write_model(engine.module, state, Path(tmp) / MODEL_DIR, source)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine) -> dict:
    """Load the latest checkpoint Ray Train hands this worker; its client state ({} on a fresh start)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as folder:
        _, client_state = engine.load_checkpoint(str(Path(folder) / DEEPSPEED_DIR), tag=TAG)
    return client_state or {}


@contextlib.contextmanager
def trained_model(checkpoint: ray.train.Checkpoint) -> Iterator[Path]:
    """A local copy of the trained model in `checkpoint`, deleted when the block ends."""
    with tempfile.TemporaryDirectory(prefix="rayfoundry-train-", ignore_cleanup_errors=True) as scratch:
        target = Path(scratch) / MODEL_DIR
        with checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / MODEL_DIR, target)
        yield target
