"""One Ray Train worker: a DeepSpeed engine around the student, batches from this worker's Ray Data
shard, the objective, periodic perplexity, checkpoints, and a restart from the latest checkpoint.

Every rank runs the same sequence of forwards, saves and reports: under ZeRO-3 a forward gathers
parameters from all ranks, and DeepSpeed's save and Ray Train's report wait for every worker.
"""
from __future__ import annotations

import math
import time

import deepspeed
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from cluster.store import Store
from jobs.compress.fake_quant import prepare_qat
from jobs.compress.recipe import Recipe
from jobs.data.prepared import open_dataset
from jobs.data.shards import read_tokens
from jobs.models.load import model_dir
from jobs.train.checkpoints import report_with_checkpoint, restore
from jobs.train.data import rank_windows, window_batches
from jobs.train.losses import training_loss
from jobs.train.memory import held_bytes
from jobs.train.progress import TrainProgress
from jobs.train.spec import WorkerSpec


def build_student(spec: WorkerSpec) -> torch.nn.Module:
    student = AutoModelForCausalLM.from_pretrained(model_dir(spec.student, Store(spec.store)), dtype=torch.float32)
    if spec.qat_recipe is not None:
        prepare_qat(student, Recipe.model_validate(spec.qat_recipe))
    if not spec.train.train_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    return student.train()


def load_teacher(spec: WorkerSpec) -> torch.nn.Module | None:
    if spec.teacher is None or not spec.loss.needs_teacher:
        return None
    teacher = AutoModelForCausalLM.from_pretrained(model_dir(spec.teacher, Store(spec.store)), dtype=torch.float32)
    teacher.eval()
    return teacher.requires_grad_(False)


def validation_windows(spec: WorkerSpec) -> torch.Tensor:
    dataset = open_dataset(spec.data, Store(spec.store))
    tokens = read_tokens(dataset, "validation", spec.train.eval_tokens)
    context = ray.train.get_context()
    return rank_windows(tokens, spec.train.eval_window, context.get_world_rank(), context.get_world_size())


@torch.no_grad()
def evaluate(engine, windows: torch.Tensor, batch_size: int) -> float:
    """Perplexity over every rank's windows together (each window scored from a fresh context)."""
    engine.module.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in torch.split(windows, batch_size):
        logits = engine(input_ids=batch.to(engine.device)).logits[:, :-1].float()
        totals[0] += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten().to(logits.device),
                                     reduction="sum").item()
        totals[1] += batch[:, 1:].numel()
    engine.module.train()
    dist.all_reduce(totals)
    return math.exp(totals[0] / totals[1])


def largest_on_any_rank(values: dict[str, int]) -> dict[str, int]:
    """Per-worker figures as the worst rank has them."""
    packed = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return {f"worker_{name}": int(v) for name, v in zip(values, packed.tolist())}


def micro_step(engine, teacher, batch: torch.Tensor, spec: WorkerSpec) -> dict[str, float]:
    batch = batch.to(engine.device)
    hidden = spec.loss.hidden_mse > 0
    teacher_out = None
    if teacher is not None:
        with torch.no_grad():
            teacher_out = teacher(input_ids=batch, output_hidden_states=hidden)
    parts = training_loss(spec.loss, batch, engine(input_ids=batch, output_hidden_states=hidden), teacher_out)
    engine.backward(parts["loss"])
    engine.step()
    return {name: value.item() for name, value in parts.items()}


def train_worker(spec_data: dict) -> list[dict]:
    """Ray Train's per-worker function; returns the metric history (rank 0's is the run's)."""
    spec = WorkerSpec.model_validate(spec_data)
    settings = spec.train
    torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
    torch.manual_seed(settings.seed)
    student, teacher = build_student(spec), load_teacher(spec)
    engine, *_ = deepspeed.initialize(model=student, config=settings.deepspeed_config(),
                                      model_parameters=[p for p in student.parameters() if p.requires_grad])
    if teacher is not None:
        teacher.to(engine.device)
    state = restore(engine)
    step, history, restarts = state.get("step", 0), state.get("history", []), state.get("restarts", -1) + 1
    accumulation = settings.zero.gradient_accumulation
    batches = window_batches(ray.train.get_dataset_shard("train"), settings.seq_len, settings.micro_batch)
    for _ in range(step * accumulation):  # the batches the restored steps already saw
        next(batches)
    validation = validation_windows(spec)
    tokens_per_step = ray.train.get_context().get_world_size() * settings.micro_batch * settings.seq_len * accumulation
    memory, progress = None, TrainProgress()
    while step < settings.steps:
        started = time.perf_counter()
        parts = [micro_step(engine, teacher, next(batches), spec) for _ in range(accumulation)]
        step += 1
        memory = memory or largest_on_any_rank(held_bytes(engine))  # once Adam's state exists
        metrics = {"step": step, "lr": engine.get_lr()[0], "restarts": restarts, **memory,
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - started),
                   **{name: sum(p[name] for p in parts) / accumulation for name in parts[0]}}
        if step % settings.eval_every == 0 or step == settings.steps:
            metrics["val_ppl"] = evaluate(engine, validation, settings.micro_batch)
        history.append(metrics)
        progress.record(metrics)
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            report_with_checkpoint(engine, metrics, {"step": step, "history": history, "restarts": restarts},
                                   model_dir(spec.student, Store(spec.store)))
        else:
            ray.train.report(metrics)
    return history
