"""QAT, distillation and ZeRO on a real Ray Train cluster with DeepSpeed (tiny random Llama, 2 workers)."""
from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from cluster.errors import UserError
from cluster.store import Store
from conftest import ray_auth_mode

pytestmark = pytest.mark.slow
TRAIN = {"workers": 2, "cpus_per_worker": 1, "steps": 4, "micro_batch": 2, "seq_len": 32, "lr": 1e-3,
         "warmup_steps": 1, "eval_every": 2, "eval_tokens": 256, "eval_window": 32, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def ray_cluster():
    """One private Ray for the module: 2 training workers and a CPU for Ray Data beside them."""
    import ray

    with ray_auth_mode("disabled"):
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


def qat_config(tmp_path: Path, home: Path, model: Path, **changes):
    from jobs.qat import QATConfig

    recipe = tmp_path / "int4.yaml"
    recipe.write_text(yaml.safe_dump({"name": "int4-g32", "steps": [
        {"method": "rtn", "bits": 4, "group_size": 32, "exclude": ["lm_head"]}]}))
    data = {"model": str(model), "recipe": str(recipe), "out": "tiny.int4-qat", "force": True,
            "distill": {"alpha": 0.5}, "train": TRAIN, "eval_tokens": 512, "eval_window": 64,
            "store": str(home / "store"), "run_name": f"qat-{tmp_path.name}", **changes}
    return QATConfig.model_validate(data)


def test_qat_trains_and_stores_a_checkpoint_that_matches_its_fake_quant_model(
        ray_cluster, tmp_path, smollm2_home, tiny_llama_dir):
    from jobs.models.load import load_causal_lm, model_dir
    from jobs.qat import run
    from kernels.compressed import CompressedLinear
    from serve_apps.engine.config import EngineConfig
    from serve_apps.engine.llm_engine import LLMEngine
    from serve_apps.engine.sampling_params import SamplingParams

    summary = run(qat_config(tmp_path, smollm2_home, tiny_llama_dir))
    assert abs(summary["checkpoint_vs_fake_quant"]) < 0.01
    assert summary["ppl_qat_fake_quant"] < summary["ppl_fp32"] * 2  # training did not blow the model up
    path = model_dir(summary["out"], Store(str(smollm2_home / "store")))
    assert isinstance(load_causal_lm(path).model.layers[0].mlp.up_proj, CompressedLinear)
    engine = LLMEngine(path, EngineConfig(kv_cache_memory_gib=0.05))
    outputs = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(outputs[0].token_ids) == 4
    results = Path(summary["results"])
    assert (results / "curves.png").stat().st_size > 0 and (results / "history.parquet").is_file()


def test_distillation_and_its_cross_entropy_baseline_train_the_same_pruned_student(
        ray_cluster, tmp_path, smollm2_home, tiny_llama_dir):
    import pyarrow.parquet as pq

    from jobs.distill import DistillConfig, run
    from jobs.models.load import load_causal_lm, model_dir

    recipe = tmp_path / "half.yaml"
    recipe.write_text(yaml.safe_dump({"name": "half", "steps": [
        {"method": "structured", "target": "layers", "fraction": 0.5}]}))
    store = str(smollm2_home / "store")
    summary = run(DistillConfig.model_validate({
        "teacher": str(tiny_llama_dir), "student": {"recipe": str(recipe)}, "out": "tiny.half-distilled",
        "force": True, "train": TRAIN, "store": store, "run_name": f"distill-{tmp_path.name}"}))
    student = load_causal_lm(model_dir(summary["out"], Store(store)))
    assert student.config.num_hidden_layers == 1
    history = pq.read_table(Path(summary["results"]) / "history.parquet").to_pylist()
    assert {row["run"] for row in history} == {"distilled", "cross-entropy only"}
    assert all(row["step"] <= TRAIN["steps"] for row in history)
    assert "kl" in next(r for r in history if r["run"] == "distilled")
    assert summary["final_val_ppl_distilled"] > 0 and summary["final_val_ppl_cross_entropy_only"] > 0


def test_zero3_holds_half_per_worker_of_zero0_over_two_workers(ray_cluster, smollm2_home, tiny_llama_dir):
    """Bytes per parameter on the worst worker: ZeRO-0 keeps the weight (4 in fp32; 2 in bf16, plus a
    4-byte fp32 master) and Adam's two moments (8). ZeRO-3 halves each over 2 workers (up to padding),
    but keeps its own fp32 master beside the weight's partition even in fp32 training."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from jobs.bench_zero import BenchZeroConfig, measure_stage

    with torch.device("meta"):
        numel = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir)).num_parameters()
    config = BenchZeroConfig(model=str(tiny_llama_dir), train={**TRAIN, "steps": 1, "eval_every": 1,
                                                               "checkpoint_every": 1},
                             store=str(smollm2_home / "store"))
    store = Store(config.store)
    expected = {("fp32", 0): (4, 8), ("fp32", 3): (2, 6), ("bf16", 0): (2, 12), ("bf16", 3): (1, 6)}
    for (precision, stage), (param_bytes, optimizer_bytes) in expected.items():
        row = measure_stage(config, stage, store, precision)
        assert row["param_mib"] * 2**20 / numel == pytest.approx(param_bytes, rel=0.02), (precision, stage)
        assert row["optimizer_mib"] * 2**20 / numel == pytest.approx(optimizer_bytes, rel=0.02), (precision, stage)


def _training_worker_pids() -> list[int]:
    """PIDs of live Ray Train workers (Ray titles each actor's process `ray::<class>...`)."""
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            pids.append(process.info["pid"])
    return sorted(pids)


def registered_checkpoints(run_folder: Path) -> list[str]:
    """The checkpoints Ray Train's controller has registered (all workers' files in storage)."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]


def _kill_a_worker_while_it_saves(run_folder: Path, stop: threading.Event) -> list[int]:
    """SIGKILL one training worker while a checkpoint is being written, once an earlier one is registered
    (so the restart has a checkpoint to resume from, and the one cut short must not be it)."""
    killed: list[int] = []
    while not stop.is_set() and not killed:
        if registered_checkpoints(run_folder) and glob.glob("/tmp/rayfoundry-ckpt-*"):
            workers = _training_worker_pids()
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed.append(workers[-1])
        time.sleep(0.02)
    return killed


def test_a_worker_killed_during_a_save_resumes_from_the_last_whole_checkpoint(
        ray_cluster, tmp_path, smollm2_home, tiny_llama_dir):
    from jobs.train.losses import LossConfig
    from jobs.train.run import fit, runs_uri
    from jobs.train.spec import WorkerSpec

    store = Store(str(smollm2_home / "store"))
    spec = WorkerSpec(student=str(tiny_llama_dir), loss=LossConfig(), data="shakespeare", store=store.uri,
                      train={**TRAIN, "steps": 10, "checkpoint_every": 1, "eval_every": 5, "max_failures": 2})
    run_folder = Path(runs_uri(store), f"killed-{tmp_path.name}")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=lambda: killed.extend(_kill_a_worker_while_it_saves(run_folder, stop)))
    killer.start()
    try:
        result = fit(spec, f"killed-{tmp_path.name}", store)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was caught saving"
    history = result.return_value
    assert [h["step"] for h in history] == list(range(1, 11))  # each step once, none lost or repeated
    # the steps before the kill came back from the checkpoint; the rest ran after one restart
    assert history[0]["restarts"] == 0 and history[-1]["restarts"] == 1
    kept = registered_checkpoints(run_folder)
    assert len(kept) == 2  # keep_checkpoints (default)
    for name in kept:  # the save cut short was never registered; what is registered is whole
        folder = run_folder / name
        assert (folder / "model" / "model.safetensors").is_file()
        assert list((folder / "deepspeed" / "state").glob("mp_rank_00_model_states.pt"))


@pytest.mark.parametrize("change, message", [
    ({"train": {**TRAIN, "zero": {"stage": 4}}}, "ZeRO stage 4 does not exist"),
    ({"train": {**TRAIN, "workers": 64}}, "64 CPUs, but the cluster has"),
    ({"train": {**TRAIN, "bogus": 1}}, "unknown key 'train.bogus'"),
    ({"model": "no-such-model"}, "no-such-model"),
])
def test_bad_qat_configs_fail_before_any_worker_starts(ray_cluster, tmp_path, smollm2_home, tiny_llama_dir,
                                                       change, message):
    from cluster.config import parse_config
    from jobs.qat import QATConfig, run

    base = qat_config(tmp_path, smollm2_home, tiny_llama_dir).model_dump(mode="json")
    runs = Path(smollm2_home / "store" / "runs")
    before = sorted(runs.glob("*")) if runs.exists() else []
    with pytest.raises(UserError, match=message):
        run(parse_config(QATConfig, {**base, **change}))
    assert (sorted(runs.glob("*")) if runs.exists() else []) == before


@pytest.mark.parametrize("student, message", [
    ("other-tokenizer", "another tokenizer"),
    ("missing-teacher", "no-such-teacher"),
])
def test_bad_distill_configs_fail_before_any_worker_starts(tmp_path, smollm2_home, tiny_llama_dir, student, message):
    import shutil

    from cluster.config import parse_config
    from jobs.distill import DistillConfig, run

    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    with open(other / "tokenizer.json", "a") as tokenizer:
        tokenizer.write("\n")  # another file, so another fingerprint
    data = {"teacher": str(tiny_llama_dir), "student": {"model": str(other)}, "out": "x",
            "store": str(smollm2_home / "store")}
    if student == "missing-teacher":
        data["teacher"] = "no-such-teacher"
    with pytest.raises(UserError, match=message):
        run(parse_config(DistillConfig, data))
