"""The embedded local Ray cluster: one head node on this machine, dashboard on 127.0.0.1, Ray's
token authentication on (RAY_AUTH_MODE=disabled before `up` turns it off).

`up` and `down` drive Ray's own `ray start` / `ray stop`; `status` reads the dashboard's HTTP
API. Nothing here is reimplemented from Ray, it only picks loopback-only, reproducible settings.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster import auth, prometheus
from cluster.errors import UserError

HOST = "127.0.0.1"
DASHBOARD_PORT = 8265
GCS_PORT = 6379
METRICS_EXPORT_PORT = 8080  # Prometheus scrapes Ray's metrics here
START_TIMEOUT_S = 90


def dashboard_url(port: int = DASHBOARD_PORT) -> str:
    return f"http://{HOST}:{port}"


def _get_json(url: str, timeout: float = 3.0):
    request = urllib.request.Request(url, headers=auth.headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UserError(
                f"the Ray cluster at {url.split('/api')[0]} refused this machine's auth token "
                f"({auth.token_path()}, or RAY_AUTH_TOKEN): use the token of the cluster's owner"
            ) from None
        raise


def running_version(port: int = DASHBOARD_PORT) -> str | None:
    """Ray's version if a dashboard answers on `port`, else None."""
    try:
        return _get_json(f"{dashboard_url(port)}/api/version")["ray_version"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def ray_cli() -> str:
    """The `ray` next to this interpreter, so jobs run with the same environment."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def env_for_ray() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every process reports its metrics every 5 s (Ray's default: 10), as often as our Prometheus scrapes,
    # so a short job's last values are seen too.
    env.setdefault("RAY_metrics_report_interval_ms", str(prometheus.SCRAPE_INTERVAL_S * 1000))
    # Every Ray process reads the mode from its environment; the token from RAY_AUTH_TOKEN or its file.
    env[auth.MODE_VARIABLE] = "token" if auth.wanted() else "disabled"
    return env


def up(num_cpus: int | None = None, port: int = DASHBOARD_PORT) -> str:
    """Start the head node unless one already answers; return a one-line report."""
    version = running_version(port)
    if version is not None:
        return f"Ray {version} cluster already running; dashboard {dashboard_url(port)}"
    command = [
        ray_cli(), "start", "--head", f"--node-ip-address={HOST}", f"--port={GCS_PORT}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={port}",
        f"--metrics-export-port={METRICS_EXPORT_PORT}", "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    token_file = auth.ensure_token() if auth.wanted() else None
    result = subprocess.run(command, env=env_for_ray(), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UserError(f"`ray start` failed: {' | '.join(tail)}")
    _wait_for_job_api(port)
    started = f"Ray {running_version(port)} cluster started; dashboard {dashboard_url(port)}, address {HOST}:{GCS_PORT}"
    if token_file is None:
        return started + ("\ntoken authentication is OFF (RAY_AUTH_MODE=disabled): anyone who reaches "
                          "its ports can run code on it")
    return started + "\n" + auth.HOW_TO_CONNECT.format(path=token_file)


def _wait_for_job_api(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            _get_json(f"{dashboard_url(port)}/api/jobs/")
            return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(1)
    raise UserError(f"the Ray dashboard did not answer on {dashboard_url(port)} within {START_TIMEOUT_S}s")


def status(port: int = DASHBOARD_PORT) -> dict:
    version = running_version(port)
    if version is None:
        return {"running": False, "dashboard": dashboard_url(port)}
    by_status: dict[str, int] = {}
    for job in list_jobs(port):
        by_status[job["status"]] = by_status.get(job["status"], 0) + 1
    auth.use_for(dashboard_url(port))  # the state API below is one of Ray's clients
    return {
        "running": True, "ray_version": version, "dashboard": dashboard_url(port),
        "address": f"{HOST}:{GCS_PORT}", "auth": "token" if auth.required_by(dashboard_url(port)) else "disabled",
        "resources": _cluster_resources(port), "jobs": by_status,
    }


def list_jobs(port: int = DASHBOARD_PORT) -> list[dict]:
    """The dashboard's job API: every job submitted to the cluster, with status and entrypoint."""
    return _get_json(f"{dashboard_url(port)}/api/jobs/")


def _cluster_resources(port: int) -> dict:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard_url(port), filters=[("state", "=", "ALIVE")], detail=True)
    total: dict[str, float] = {"nodes": len(nodes)}
    for node in nodes:
        for key in ("CPU", "GPU", "memory"):
            total[key] = total.get(key, 0) + node.resources_total.get(key, 0)
    return total


def down() -> str:
    if running_version() is None:
        return "no local Ray cluster is running"
    result = subprocess.run([ray_cli(), "stop"], env=env_for_ray(), capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`ray stop` failed: {result.stderr.strip().splitlines()[-1:]}")
    return "local Ray cluster stopped"
