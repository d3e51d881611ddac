"""The embedded local Ray cluster: one head node on this machine, dashboard on 127.0.0.1.

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

from cluster.errors import UserError

HOST = "127.0.0.1"
DASHBOARD_PORT = 8265
GCS_PORT = 6379
METRICS_EXPORT_PORT = 8080  # Prometheus scrapes Ray's metrics here
START_TIMEOUT_S = 90


def dashboard_url(port: int = DASHBOARD_PORT) -> str:
    return f"http://{HOST}:{port}"


def _auth_headers() -> dict[str, str]:
    """Ray's token header when the user asked for token authentication (RAY_AUTH_MODE=token)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return get_auth_headers_if_auth_enabled({})


def _get_json(url: str, timeout: float = 3.0):
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UserError(
                f"the Ray cluster at {url.split('/api')[0]} requires its auth token: "
                "export RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        raise


def running_version(port: int = DASHBOARD_PORT) -> str | None:
    """Ray's version if a dashboard answers on `port`, else None."""
    try:
        return _get_json(f"{dashboard_url(port)}/api/version")["ray_version"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def _ray_cli() -> str:
    """The `ray` next to this interpreter, so jobs run with the same environment."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _env_for_ray() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every port binds to 127.0.0.1. Ray would turn token authentication on whenever some earlier
    # `ray.init()` left a token in ~/.ray, and then a plain `ray job submit` fails; we make the
    # choice explicit instead: off unless the user sets RAY_AUTH_MODE=token themselves.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def up(num_cpus: int | None = None, port: int = DASHBOARD_PORT) -> str:
    """Start the head node unless one already answers; return a one-line report."""
    version = running_version(port)
    if version is not None:
        return f"Ray {version} cluster already running; dashboard {dashboard_url(port)}"
    command = [
        _ray_cli(), "start", "--head", f"--node-ip-address={HOST}", f"--port={GCS_PORT}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={port}",
        f"--metrics-export-port={METRICS_EXPORT_PORT}", "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    result = subprocess.run(command, env=_env_for_ray(), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UserError(f"`ray start` failed: {' | '.join(tail)}")
    _wait_for_job_api(port)
    return f"Ray {running_version(port)} cluster started; dashboard {dashboard_url(port)}, address {HOST}:{GCS_PORT}"


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
    return {
        "running": True, "ray_version": version, "dashboard": dashboard_url(port),
        "address": f"{HOST}:{GCS_PORT}", "resources": _cluster_resources(port), "jobs": by_status,
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
    result = subprocess.run([_ray_cli(), "stop"], env=_env_for_ray(), capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`ray stop` failed: {result.stderr.strip().splitlines()[-1:]}")
    return "local Ray cluster stopped"
