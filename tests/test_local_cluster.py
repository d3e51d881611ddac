"""The embedded local cluster: `rayfoundry up/status/down` and a data job through `ray job submit`."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

from cluster import auth, prometheus
from cluster.local_cluster import list_jobs, running_version
from cluster.metrics import NODE_CPU_COUNT, series
from conftest import RAYFOUNDRY, REPO, env_with_home, run

RAY = str(Path(sys.executable).with_name("ray"))
STARTED_HERE = {"cluster": False}


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """`rayfoundry up` (twice: the second only reports); stopped afterwards if this test started it.
    Ray's own clients get RAY_AUTH_MODE=token, as the README and `rayfoundry up` tell users."""
    env = {**env_with_home(tmp_path_factory.mktemp("home"), jobs_here=False), "RAY_AUTH_MODE": "token"}
    was_running = running_version() is not None
    STARTED_HERE["cluster"] = not was_running
    first = run([*RAYFOUNDRY, "up"], env, timeout=300)
    assert first.returncode == 0, first.stderr
    second = run([*RAYFOUNDRY, "up"], env, timeout=60)
    assert second.returncode == 0 and "already running" in second.stdout
    yield env
    if not was_running:
        stopped = run([*RAYFOUNDRY, "down"], env, timeout=120)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert ("Prometheus stopped" in stopped.stdout) == (prometheus.binary() is not None)
        assert running_version() is None
        again = run([*RAYFOUNDRY, "down"], env, timeout=60)
        assert again.returncode == 0 and "no local Ray cluster is running" in again.stdout


def test_status_reports_the_running_cluster(local_cluster):
    result = run([*RAYFOUNDRY, "status"], local_cluster, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["running"] and report["dashboard"] == "http://127.0.0.1:8265"
    assert report["resources"]["nodes"] >= 1 and report["resources"]["CPU"] >= 1


def test_up_starts_a_prometheus_that_scrapes_the_cluster(local_cluster):
    if prometheus.binary() is None:
        pytest.skip(prometheus.INSTALL_HINT)
    report = json.loads(run([*RAYFOUNDRY, "status"], local_cluster, timeout=60).stdout)["prometheus"]
    assert report["running"] and report["url"] == "http://127.0.0.1:9090"
    deadline, nodes = time.monotonic() + 60, []
    while not nodes and time.monotonic() < deadline:  # Ray's discovery file read, then a scrape
        nodes = prometheus.query(report["url"], f"count({series(NODE_CPU_COUNT)})")
        time.sleep(1)
    assert nodes and float(nodes[0]["value"][1]) >= 1, "Prometheus never saw the node's metrics agent"
    report = json.loads(run([*RAYFOUNDRY, "status"], local_cluster, timeout=60).stdout)["prometheus"]
    assert report["targets"] >= 1 and report["targets_up"] >= 1


def test_up_puts_the_grafana_dashboards_in_the_store_and_beside_rays_own(local_cluster):
    from cluster.local_cluster import GCS_PORT
    from cluster.processes import session_dir

    folder = session_dir(GCS_PORT) / "metrics" / "grafana" / "dashboards"
    assert (folder / "default_grafana_dashboard.json").is_file(), "Ray's own dashboards are not there"
    uids = {json.loads(path.read_text())["uid"] for path in folder.glob("rayfoundry-*.json")}
    assert uids == {"rayfoundry-serving", "rayfoundry-training", "rayfoundry-search", "rayfoundry-cluster"}
    stored = Path(local_cluster["RAYFOUNDRY_HOME"]) / "store" / "results" / "dashboards"
    assert {path.name for path in folder.glob("rayfoundry-*.json")} < {p.name for p in stored.iterdir()}


def test_the_cluster_refuses_a_request_without_its_token(local_cluster):
    """`rayfoundry up` turns Ray's token authentication on (a cluster someone started otherwise is theirs)."""
    import urllib.error
    import urllib.request

    report = json.loads(run([*RAYFOUNDRY, "status"], local_cluster, timeout=60).stdout)
    if report["auth"] == "disabled" and not STARTED_HERE["cluster"]:
        pytest.skip("the cluster already running was started with token authentication off, by its owner")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen("http://127.0.0.1:8265/api/jobs/", timeout=30)
    assert refused.value.code == 401 and report["auth"] == "token"
    request = urllib.request.Request("http://127.0.0.1:8265/api/jobs/", headers=auth.headers())
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
    assert "RAY_AUTH_TOKEN" in os.environ or auth.token_path().stat().st_mode & 0o077 == 0


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


def _train_runs() -> list[dict]:
    """The dashboard's Ray Train view of Train v2 runs."""
    import urllib.request

    request = urllib.request.Request("http://127.0.0.1:8265/api/train/v2/runs/v1", headers=auth.headers())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["train_runs"]


def _metrics_text() -> str:
    import urllib.request

    from cluster.local_cluster import METRICS_EXPORT_PORT

    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_EXPORT_PORT}/metrics", timeout=30) as response:
        return response.read().decode()


def test_qat_runs_as_a_ray_job_with_its_run_and_progress_in_the_dashboard(local_cluster, tmp_path, tiny_llama_dir,
                                                                         smollm2_home):
    import yaml

    from cluster.dashboards import training
    from cluster.metrics import TRAIN_LOSS

    recipe = tmp_path / "int4.yaml"
    recipe.write_text(yaml.safe_dump({"name": "int4", "steps": [{"method": "rtn", "bits": 4, "group_size": 32,
                                                                 "exclude": ["lm_head"]}]}))
    run_name = f"qat-job-{tmp_path.name}"
    config = tmp_path / "qat.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_llama_dir), "recipe": str(recipe), "out": "tiny.int4-qat-job", "force": True,
        "store": str(smollm2_home / "store"), "run_name": run_name, "eval_tokens": 512, "eval_window": 64,
        # Half a CPU each: the cluster may already host a Serve replica on one of a 2-core machine's CPUs.
        # Steps enough for Ray's 10 s metrics report to see the run's loss while it trains.
        "train": {"workers": 2, "cpus_per_worker": 0.5, "steps": 16, "micro_batch": 2, "seq_len": 32,
                  "eval_every": 8, "eval_tokens": 256, "eval_window": 32, "checkpoint_every": 8}}))
    submitted = run([RAY, "job", "submit", "--no-wait", "--working-dir", ".", "--", "python", "-m", "jobs.qat",
                     "--config", str(config)], local_cluster, cwd=REPO, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = submitted.stdout.split("Job '")[1].split("'")[0]
    started = time.time()
    seen_metric, deadline = False, time.monotonic() + 900
    while time.monotonic() < deadline:
        seen_metric = seen_metric or f'ray_{TRAIN_LOSS.name}{{' in _metrics_text() and run_name in _metrics_text()
        status = {job["submission_id"]: job for job in list_jobs()}[job_id]["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = run([RAY, "job", "logs", job_id], local_cluster, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert seen_metric, "the run's loss never reached Ray's metrics endpoint"
    runs = {r["name"]: r for r in _train_runs()}
    assert runs[run_name]["status"] == "FINISHED"
    _every_panel_has_data(training(), started, tmp_path)


def _every_panel_has_data(dashboard, since: float, out: Path) -> None:
    """Through the cluster's Prometheus (which `rayfoundry up` started), each panel drawn from query_range
    since `since` has a point: the dashboard names only metrics the job exported."""
    from cluster.dashboard_render import render

    if prometheus.binary() is None:
        pytest.skip(prometheus.INSTALL_HINT)
    time.sleep(prometheus.SCRAPE_INTERVAL_S + 1)  # the job's last values scraped
    (sheet,) = render([dashboard], f"http://127.0.0.1:{prometheus.PORT}", time.time() - since, out)
    assert sheet.without_data == (), f"{dashboard.title}: panels without data"


def test_a_search_runs_as_a_ray_job_and_its_progress_reaches_prometheus(local_cluster, tmp_path, tiny_llama_dir,
                                                                        smollm2_home):
    """Two trials of a search through `ray job submit`; the Search dashboard's panels have data."""
    import yaml

    from cluster.dashboards import search

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "name": f"observed-{tmp_path.name}", "model": str(tiny_llama_dir), "data": "shakespeare",
        "store": str(smollm2_home / "store"), "eval": {"tokens": 256, "window": 64, "batch_size": 2},
        "budget": {"max_ppl_increase": 0.5}, "objectives": ["ppl", "linear_bytes"],
        "space": {"bits": [4, 8, None], "group_size": [32, None], "quant_method": ["rtn"], "head_bits": [8, None]},
        "seeds": {"recipes": ["configs/recipes/int8-weight.yaml"]},  # one trial within the budget at least
        "searcher": {"kind": "random"}, "num_trials": 2, "resources_per_trial": {"cpu": 0.5}}))
    started = time.time()
    submitted = run([RAY, "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.search",
                     "--config", str(config)], local_cluster, cwd=REPO, timeout=900)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    _every_panel_has_data(search(), started, tmp_path)
