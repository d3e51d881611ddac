"""`rayfoundry` runs its jobs on a Ray cluster through the Job Submission API when one answers: the
dashboard lists them, they use the caller's store, and a user error is still one line on stderr with
exit code 2. The cluster here is this module's own, on free ports, so no other cluster is touched."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import local_cluster
from cluster.submit import cluster_address, is_this_machine
from conftest import RAYFOUNDRY, REPO, env_with_home, free_port, run

RAY = str(Path(sys.executable).with_name("ray"))


def test_jobs_go_where_ray_job_submit_would_send_them(monkeypatch):
    assert is_this_machine("http://127.0.0.1:8265") and not is_this_machine("http://head:8265")
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(local_cluster, "running_version", lambda: None)
    assert cluster_address() is None  # no cluster: run here
    monkeypatch.setattr(local_cluster, "running_version", lambda: "2.60.0")
    assert cluster_address() == "http://127.0.0.1:8265"  # the local cluster `rayfoundry up` starts
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert cluster_address() == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "local")  # as ray.init(address="local"): a private Ray, so here
    assert cluster_address() is None


def wait_for_dashboard(head: subprocess.Popen, port: int, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while local_cluster.running_version(port) is None:
        assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)


@pytest.fixture(scope="module")
def dashboard():
    """A one-node Ray cluster of our own (`ray start --block`, every port free, its own temp dir, so
    neither a cluster on 8265 nor Ray's record of the current cluster is touched); SIGTERM ends it."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rf-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    ports = {"port": free_port(), "dashboard-port": port, "dashboard-agent-listen-port": free_port(),
             "ray-client-server-port": free_port(), "metrics-export-port": free_port()}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the job's `python`
    env.pop("RAY_ADDRESS", None)
    log = temp_dir / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen([RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}",
                                 "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=1",
                                 "--include-dashboard=true", "--disable-usage-stats",
                                 *(f"--{name}={value}" for name, value in ports.items())],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_dashboard(head, port, log)
        yield port
    finally:
        head.terminate()
        head.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submitted(dashboard: int, home: Path, *args: str):
    """`rayfoundry ...` pointed at our cluster, and the job it submitted as the dashboard lists it."""
    env = {**env_with_home(home), "RAY_ADDRESS": local_cluster.dashboard_url(dashboard)}
    result = run([*RAYFOUNDRY, *args], env, timeout=600)
    job_id = result.stdout.split("Ray job ")[1].split()[0]
    jobs = {job["submission_id"]: job for job in local_cluster.list_jobs(dashboard)}
    return result, jobs[job_id]


@pytest.mark.slow
def test_a_job_is_submitted_and_uses_the_callers_store(dashboard, tmp_path):
    folder = tmp_path / "tiny-folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # `models add` of a local folder copies it as it is
    relative = os.path.relpath(folder, REPO)  # as typed in the repository: this cluster is on this machine
    result, job = submitted(dashboard, tmp_path / "home", "models", "add", relative, "--name", "tiny")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job["status"] == "SUCCEEDED" and job["entrypoint"] == f"python -m jobs.add_model {folder} --name tiny"
    assert (tmp_path / "home" / "store" / "models" / "tiny" / "manifest.json").is_file()  # RAYFOUNDRY_HOME went along
    assert result.stdout.splitlines()[-1].startswith("stored in ")  # the job's own last line ends the output


@pytest.mark.slow
def test_a_user_error_in_a_submitted_job_is_one_line_on_stderr_and_exit_code_2(dashboard, tmp_path):
    result, job = submitted(dashboard, tmp_path / "home", "eval", "ppl", "--model", "nope", "--data", "nope")
    assert result.returncode == 2 and job["status"] == "FAILED"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayfoundry eval ppl: error: no model named 'nope'"), result.stderr
