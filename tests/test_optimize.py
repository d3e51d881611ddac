"""`rayfoundry optimize`: search, (QAT,) store, a Serve config and one report, end to end on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serve_apps.serve_run import check as check_serve_config

pytestmark = pytest.mark.slow


@pytest.fixture
def search_yaml(tmp_path, smollm2_home) -> str:
    data = str(smollm2_home / "store" / "datasets" / "shakespeare")
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({
        "name": "unused", "model": "unused", "data": data, "budget": {"max_ppl_increase": 0.05},
        "eval": {"tokens": 512, "window": 64, "batch_size": 2},
        "calibration": {"data": data, "samples": 4, "seq_len": 32},
        "objectives": ["ppl", "linear_bytes", "decode_b1"],
        "space": {"bits": [4, 8, None], "group_size": [32, None], "quant_method": ["rtn", "gptq"],
                  "head_bits": [8, None]},
        "seeds": {"recipes": ["configs/recipes/int8-weight.yaml"]},
        "searcher": {"kind": "random"}, "num_trials": 2,
        "speed": {"batch_n": 4, "prompt_tokens": 8, "max_tokens": 8}}))
    return str(path)


def stored(home: Path, kind: str) -> list[Path]:
    folder = home / "store" / kind
    return sorted(folder.iterdir()) if folder.exists() else []


def test_optimize_searches_trains_stores_and_reports(cli, home, tiny_llama_dir, smollm2_home, search_yaml, tmp_path):
    """The whole way with --recover qat (the plain way is the same minus the QAT step)."""
    qat = tmp_path / "qat.yaml"
    qat.write_text(yaml.safe_dump({
        "model": "unused", "recipe": "unused", "out": "unused", "eval_tokens": 256, "eval_window": 64,
        "train": {"workers": 1, "cpus_per_worker": 1, "steps": 2, "micro_batch": 1, "seq_len": 32,
                  "eval_every": 2, "eval_tokens": 128, "eval_window": 64, "checkpoint_every": 2}}))
    data = str(smollm2_home / "store" / "datasets" / "shakespeare")
    done = cli("optimize", "--model", str(tiny_llama_dir), "--data", data, "--max-ppl-increase", "50%",
               "--trials", "3", "--config", search_yaml, "--recover", "qat", "--qat-config", str(qat),
               "--out", "tiny-qat")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "narrowed to round-to-nearest" in done.stdout
    manifest = json.loads((home / "store" / "models" / "tiny-qat" / "manifest.json").read_text())
    assert manifest["trained"] == "qat" and {s["method"] for s in manifest["recipe"]["steps"]} == {"rtn"}
    (report,) = [p for p in stored(home, "results") if p.name.startswith("optimize-")]
    text = (report / "report.md").read_text()
    assert "| original |" in text and "| optimized + QAT |" in text and "Search: 3 trials" in text
    assert (report / "report.png").stat().st_size > 0
    assert check_serve_config(report / "serve.yaml") == 1
    served = yaml.safe_load((report / "serve.yaml").read_text())["applications"][0]["args"]["models"][0]
    assert served["model_id"] == "tiny-qat" and Path(served["model"].removeprefix("file://")).is_dir()
    rows = json.loads((report / "summary.json").read_text())["rows"]
    assert rows[1]["linear_bytes"] < rows[0]["linear_bytes"]
    assert all(r["decode_b1"] and r["decode_bN"] for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--max-ppl-increase", "five"], "give a percentage such as 5%"),
    (["--max-ppl-increase", "5%", "--serve"], "none answers"),
])
def test_bad_optimize_arguments_fail_before_any_work(cli, home, tiny_llama_dir, args, message):
    done = cli("optimize", "--model", str(tiny_llama_dir), *args)
    assert done.returncode == 2 and message in done.stderr
    assert not stored(home, "results") and not (home / "store" / "runs").exists()
