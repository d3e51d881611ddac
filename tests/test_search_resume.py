"""A search whose driver is killed resumes from the store and redoes no finished trial."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import RAYFOUNDRY, REPO, env_with_home, run
from jobs.search.trial import TrialCache

pytestmark = pytest.mark.slow


def test_a_killed_search_resumes_without_redoing_finished_trials(tmp_path, tiny_llama_dir, smollm2_home):
    data = str(smollm2_home / "store" / "datasets" / "shakespeare")
    store = tmp_path / "store"
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "name": "resume", "model": str(tiny_llama_dir), "data": data, "store": str(store),
        "eval": {"tokens": 512, "window": 64, "batch_size": 2}, "budget": {"max_ppl_increase": 0.05},
        "objectives": ["ppl", "linear_bytes"],
        "space": {"bits": [4, 8, None], "group_size": [32, None], "head_bits": [8, None]},
        "searcher": {"kind": "random", "seed": 3}, "num_trials": 4, "concurrency": 1}))
    command = [sys.executable, "-m", "jobs.search", "--config", str(config)]
    env = env_with_home(tmp_path / "home")  # RAY_ADDRESS=local: the driver's own Ray, which dies with it
    cache = TrialCache(str(store), "search-resume")

    # Its own session, so one signal takes the driver and the Ray processes it started.
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 600
    while cache.count() < 2:
        assert first.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished = {p.stem: yaml.safe_load(p.read_text()) for p in Path(cache.root).glob("*.json")}
    shown = run([*RAYFOUNDRY, "search", "show", "resume", "--store", str(store)], env)
    assert shown.returncode == 0 and f"{len(finished)} trials finished" in shown.stdout, shown.stdout

    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming search resume" in second.stdout
    (results,) = (store / "results").iterdir()
    rows = {r["recipe_name"]: r for r in pq.read_table(results / "results.parquet").to_pylist()}
    assert len(pq.read_table(results / "results.parquet")) == 4
    for name, before in finished.items():  # measured once, by the first driver's trial process
        again = rows[name]
        assert (again["measured_by_pid"], again["computed_at"]) == (before["measured_by_pid"], before["computed_at"])
