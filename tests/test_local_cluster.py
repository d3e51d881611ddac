"""The embedded local cluster: `rayfoundry up/status/down` and a data job through `ray job submit`."""
import json
import sys
from pathlib import Path

import pytest

from cluster.local_cluster import list_jobs, running_version
from conftest import RAYFOUNDRY, REPO, env_with_home, run

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """`rayfoundry up` (twice: the second only reports); stopped afterwards if this test started it."""
    env = env_with_home(tmp_path_factory.mktemp("home"))
    was_running = running_version() is not None
    first = run([*RAYFOUNDRY, "up"], env, timeout=300)
    assert first.returncode == 0, first.stderr
    second = run([*RAYFOUNDRY, "up"], env, timeout=60)
    assert second.returncode == 0 and "already running" in second.stdout
    yield env
    if not was_running:
        stopped = run([*RAYFOUNDRY, "down"], env, timeout=120)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert running_version() is None
        again = run([*RAYFOUNDRY, "down"], env, timeout=60)
        assert again.returncode == 0 and "no local Ray cluster is running" in again.stdout


def test_status_reports_the_running_cluster(local_cluster):
    result = run([*RAYFOUNDRY, "status"], local_cluster, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["running"] and report["dashboard"] == "http://127.0.0.1:8265"
    assert report["resources"]["nodes"] >= 1 and report["resources"]["CPU"] >= 1


def test_prepare_data_runs_as_a_ray_job_listed_by_the_dashboard(local_cluster, tmp_path, tiny_llama_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Friends, Romans, countrymen, line {i}.\n" for i in range(300)))
    store = tmp_path / "store"  # explicit, so the job writes here whatever env the cluster has
    config = tmp_path / "data.yaml"
    config.write_text(f"name: romans\ntokenizer: {tiny_llama_dir}\nstore: {store}\n"
                      f"source: {{kind: txt, paths: ['{corpus}']}}\n")
    submitted = run([RAY, "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.prepare_data",
                     "--config", str(config)], local_cluster, cwd=REPO, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = submitted.stdout.split("Job '")[1].split("'")[0]

    jobs = {job["submission_id"]: job for job in list_jobs()}  # GET /api/jobs/ on the dashboard
    assert jobs[job_id]["status"] == "SUCCEEDED"
    assert "jobs.prepare_data" in jobs[job_id]["entrypoint"]
    manifest = json.loads((store / "datasets" / "romans" / "manifest.json").read_text())
    assert manifest["splits"]["validation"]["tokens"] > 0 and manifest["splits"]["train"]["tokens"] > 0
