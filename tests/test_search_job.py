"""A search on a real two-node Ray cluster (`ray.cluster_utils.Cluster`): trials on both nodes, a
failing trial recorded while the search goes on, the front non-dominated, the chosen recipe
reproduced by `python -m jobs.compress`; and a budget no trial meets, exit 3."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster.config import parse_config
from cluster.errors import BUDGET_NOT_MET_EXIT_CODE
from cluster.store import Store
from conftest import RAYFOUNDRY, env_with_home, ray_auth_mode, run
from jobs.compress.__main__ import main as compress_main
from jobs.compress.recipe import apply_recipe
from jobs.data.prepared import open_dataset
from jobs.data.shards import read_tokens
from jobs.eval.perplexity import perplexity
from jobs.models.load import load_causal_lm
from jobs.search.config import SearchConfig
from jobs.search.front import dominates
from jobs.search.prepare import prepare
from jobs.search.replay import replay_stopped
from jobs.search.run import run_search
from jobs.search.sensitivity import ProbeContext, probes_for
from jobs.search.shared import ensure_statistics, load_statistics
from jobs.search.trial import run_trial

pytestmark = pytest.mark.slow
FAILING_SEED = "int4-rtn-g128"


@pytest.fixture(scope="module")
def two_nodes():
    """Two nodes of one CPU each. Their workers import this module (the failing trainable below), so
    the nodes start with the tests folder on their path."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), saved) if p)
    with ray_auth_mode("disabled"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


def fail_one_seed(point: dict, context) -> None:
    """run_trial, except that the int4 seed raises: a trial that fails as a bug or a lost worker would."""
    recipe = context.recipe(point)
    if recipe is not None and context.seeds.get(recipe.name) == FAILING_SEED:
        raise RuntimeError("this trial fails on purpose")
    run_trial(point, context)


def results_of(store: Path) -> Path:
    (folder,) = (store / "results").iterdir()
    return folder


def test_trials_run_on_both_nodes_a_failure_is_recorded_and_the_chosen_recipe_reproduces(
        two_nodes, tmp_path, tiny_llama_dir, smollm2_home, capsys):
    data = str(smollm2_home / "store" / "datasets" / "shakespeare")
    store = tmp_path / "store"
    config = parse_config(SearchConfig, {
        "name": "two-nodes", "model": str(tiny_llama_dir), "data": data, "store": str(store),
        "eval": {"tokens": 512, "window": 64, "batch_size": 2},
        "calibration": {"data": data, "samples": 4, "seq_len": 32},
        "budget": {"max_ppl_increase": 0.05}, "objectives": ["ppl", "linear_bytes", "decode_b1"],
        "space": {"bits": [4, 8, None], "group_size": [32, 128, None], "quant_method": ["rtn", "gptq"],
                  "sparsity": {"low": 0, "high": 0.5, "step": 0.25}, "prune_method": ["magnitude", "wanda"],
                  "head_bits": [8, None]},
        "seeds": {"recipes": ["configs/recipes/int8-weight.yaml", f"configs/recipes/{FAILING_SEED}.yaml"],
                  "sensitivity": {"tokens": 256, "shares": [1.0]}},
        "searcher": {"kind": "optuna-tpe", "n_startup_trials": 2}, "num_trials": 6, "concurrency": 2,
        "speed": {"batch_n": 4, "prompt_tokens": 8, "max_tokens": 8},
        "choose": {"min_decode_b1_vs": "int8-weight"}, "verify": "front"})
    assert run_search(config, trial_fn=fail_one_seed) == 0
    out = capsys.readouterr().out
    folder = results_of(store)
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert len(rows) == 6
    (failed,) = [r for r in rows if r["status"] == "error"]
    assert failed["seed_name"] == FAILING_SEED and "fails on purpose" in failed["error"]
    ran = [r for r in rows if r["status"] != "error"]
    assert len({r["node_id"] for r in ran}) == 2, "trials ran on one node only"
    complete = [r for r in rows if r["status"] == "complete"]
    front = [r for r in complete if r["on_front"]]
    assert front and all(not dominates(o, f, config.objectives) for f in front for o in complete)
    assert all(any(dominates(f, r, config.objectives) for f in front) for r in complete if not r["on_front"])

    summary = json.loads((folder / "summary.json").read_text())
    check_sensitivity(summary["sensitivity"], rows, out, config, store)
    chosen = next(r for r in rows if r["recipe_name"] == summary["chosen"])
    check_speed_floor(summary, chosen)
    assert summary["reproduced"]["same_to_4_digits"], summary["reproduced"]
    others = {r["recipe_name"] for r in front if r["recipe_yaml"]} - {chosen["recipe_name"]}
    assert {c["recipe_name"] for c in summary["front_reproduced"]} == others
    assert all(c["same_to_4_digits"] for c in summary["front_reproduced"]), summary["front_reproduced"]
    assert f"chosen: {chosen['recipe_name']}" in out and "## Front" in out
    assert (folder / "results.png").stat().st_size > 0

    # The chosen recipe is an ordinary recipe file: jobs.compress gives the trial's perplexity again.
    assert compress_main(["--model", str(tiny_llama_dir), "--recipe", str(folder / "chosen.yaml"),
                          "--out", str(tmp_path / "again"), "--store", str(store)]) == 0
    tokens = torch.from_numpy(read_tokens(open_dataset(data, Store(str(store))), "validation", 512).astype("int64"))
    torch.set_num_threads(1)
    again = perplexity(load_causal_lm(tmp_path / "again"), tokens, 64, 2).ppl
    assert f"{again:.4g}" == f"{chosen['ppl']:.4g}"
    assert (store / "models" / summary["chosen_model"]).is_dir()

    shown = run([*RAYFOUNDRY, "search", "show", "two-nodes", "--store", str(store)], env_with_home(tmp_path / "h"))
    assert shown.returncode == 0 and "## Front" in shown.stdout and "## chosen.yaml" in shown.stdout
    assert f"name: {chosen['recipe_name']}" in shown.stdout
    unknown = run([*RAYFOUNDRY, "search", "show", "nothing", "--store", str(store)], env_with_home(tmp_path / "h"))
    assert unknown.returncode == 2 and "no search named 'nothing'" in unknown.stderr


def check_speed_floor(summary: dict, chosen: dict) -> None:
    """The chosen recipe is int8-weight itself (every candidate measured was slower), or measured in turns
    against it and no slower, every candidate measured before it slower."""
    checks = summary["speed_checks"]
    if chosen["seed_name"] == "int8-weight":
        assert all(not c["passed"] for c in checks)
        return
    *slower, last = checks
    assert last["recipe_name"] == chosen["recipe_name"] and last["passed"] and not any(c["passed"] for c in slower)
    assert len(last["samples"]) == len(last["reference_samples"]) == 3
    assert last["decode_b1"] >= last["reference_decode_b1"] > 0


def check_sensitivity(table: list[dict], rows: list[dict], out: str, config: SearchConfig, store: Path) -> None:
    """Every probe measured (by tasks on either node) and cached; a probe's perplexity is what its recipe,
    applied alone, gives; the mixed seed ran as a trial or was reported as rendering like another seed."""
    prepared = prepare(config, Store(str(store)))
    probes = probes_for(config, prepared.found, prepared.groups)
    assert sorted((r["group"], r["bits"], r["group_size"]) for r in table) == \
        sorted((p.group, p.bits, p.group_size) for p in probes)
    assert [a.name for a in (store / "cache").iterdir() if a.name.startswith("sensitivity-")]
    stats_entry = ensure_statistics(config, prepared.groups, Store(str(store)))  # stored by the search
    context = ProbeContext(config, prepared.groups, prepared.found, str(config.model), str(store),
                           prepared.eval_tokens[:256], stats_entry)
    probe = next(p for p in probes if p.bits == 4)
    model = load_causal_lm(Path(config.model))
    recipe = context.recipe(probe)
    apply_recipe(model, recipe, None, progress=False, stats=load_statistics(str(store), stats_entry, model, recipe))
    row = next(r for r in table if (r["group"], r["bits"], r["group_size"]) == (probe.group, 4, probe.group_size))
    torch.set_num_threads(1)
    assert f"{perplexity(model, prepared.eval_tokens[:256], 64, 2).ppl:.4g}" == f"{row['ppl']:.4g}"
    if "sensitivity: seed sensitivity-1 (" in out:  # rendered like a recipe seed: that seed is its trial
        assert "not added" in out
    else:
        assert [r for r in rows if r["seed_name"] == "sensitivity-1"]


def test_a_budget_no_trial_meets_exits_3_naming_the_closest(two_nodes, tmp_path, smollm2_dir, smollm2_home, capsys):
    """SmolLM2 with 60 or 70 % of its weights pruned (a grid of the two) cannot stay within 1 %
    perplexity: every trial is stopped after its first window, and the search says which came closest;
    replayed to the end, the stopped trials confirm it."""
    data = str(smollm2_home / "store" / "datasets" / "shakespeare")
    store = tmp_path / "store"
    config = parse_config(SearchConfig, {
        "name": "hopeless", "model": str(smollm2_dir), "data": data, "store": str(store),
        "eval": {"tokens": 256, "window": 64, "batch_size": 1}, "budget": {"max_ppl_increase": 0.01},
        "objectives": ["ppl", "linear_bytes"],
        "space": {"per_group": [], "bits": [None], "sparsity": {"low": 0.6, "high": 0.7, "step": 0.1}},
        "searcher": {"kind": "grid"}, "num_trials": 2, "concurrency": 2,
        "early_stopping": {"grace_windows": 1}})
    assert run_search(config) == BUDGET_NOT_MET_EXIT_CODE
    out = capsys.readouterr().out
    rows = pq.read_table(results_of(store) / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["stopped", "stopped"]
    assert sorted(json.loads(r["params_json"])["all"]["sparsity"] for r in rows) == [0.6, 0.7]  # the grid
    assert all(r["windows_done"] == 1 and r["tokens_evaluated"] == 64 for r in rows)
    best = min(rows, key=lambda r: r["ppl_ratio"])
    assert "no trial met ppl <= " in out and f"closest: {best['recipe_name']}" in out
    assert math.isfinite(best["ppl"])
    assert not (store / "models").exists()  # nothing chosen, nothing stored

    # Run to the end, the two stopped trials read 4x the tokens, and still no recipe is chosen.
    assert replay_stopped(config) == 0
    (replayed,) = [f for f in (store / "results").iterdir() if "-replay-" in f.name]
    report = json.loads((replayed / "replay.json").read_text())
    assert (report["tokens_search"], report["tokens_to_end"], report["saving"]) == (128, 512, 4.0)
    assert report["same_choice"] and report["full"] is None and report["within_budget_at_end"] == []
    again = pq.read_table(replayed / "replayed.parquet").to_pylist()
    assert sorted(r["recipe_name"] for r in again) == sorted(r["recipe_name"] for r in rows)
    assert all(r["status"] == "complete" and r["windows_done"] == 4 for r in again)
    assert min(r["ppl_ratio"] for r in again) > 1.01
