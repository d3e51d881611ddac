"""A Prometheus for the local cluster, on 127.0.0.1:9090, scraping every node Ray lists.

Ray writes the metrics endpoints of its nodes (each node's metrics agent, the GCS, the autoscaler) to
`<session>/prom_metrics_service_discovery.json` and keeps it current as nodes come and go; our config
reads that file, so new nodes are scraped without a restart. `rayfoundry up` starts it when the binary is
installed, since dashboards are only as useful as the history behind them; `rayfoundry down` ends it by
the PID it recorded, after checking that PID is still our Prometheus. Its files (config, PID, log, data)
live in the Ray session's folder, so each cluster's Prometheus is found from the cluster itself.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import UserError
from cluster.processes import end_pids

HOST = "127.0.0.1"
PORT = 9090
SCRAPE_INTERVAL_S = 5
RETENTION = "7d"
START_TIMEOUT_S = 60
SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"
INSTALL_HINT = ("Prometheus is not installed: `sudo apt-get install prometheus` (Debian, Ubuntu), or put the "
                "binary from https://prometheus.io/download/ on PATH; `bash cluster/install.sh` does the former "
                "where it can. Meanwhile the metrics stay on Ray's endpoint.")


@dataclass(frozen=True)
class Prometheus:
    """The files of our Prometheus under one folder."""

    folder: Path
    port: int = PORT

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.folder / "prometheus.yml"

    @property
    def pid_path(self) -> Path:
        return self.folder / "prometheus.pid"

    @property
    def log_path(self) -> Path:
        return self.folder / "prometheus.log"


def of_session(session: Path) -> Prometheus:
    """The Prometheus of the Ray cluster whose session folder is `session`."""
    return Prometheus(session / "rayfoundry" / "prometheus")


def binary() -> str | None:
    return shutil.which("prometheus")


def config_text(session: Path, interval_s: float = SCRAPE_INTERVAL_S) -> str:
    """Prometheus's config (YAML is a superset of JSON): Ray's nodes, from the session's discovery file."""
    config = {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
        "scrape_configs": [{"job_name": "ray",
                            "file_sd_configs": [{"files": [str(session / SERVICE_DISCOVERY_FILE)],
                                                 "refresh_interval": f"{interval_s:g}s"}]}],
    }
    return json.dumps(config, indent=2) + "\n"


def pid(prometheus: Prometheus) -> int | None:
    """The PID of our running Prometheus: recorded by `start`, and still a prometheus reading our config."""
    try:
        recorded = int(prometheus.pid_path.read_text())
        command = Path(f"/proc/{recorded}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return None
    return recorded if "prometheus" in command and str(prometheus.config_path) in command else None


def ready(prometheus: Prometheus, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(prometheus: Prometheus, session: Path, interval_s: float = SCRAPE_INTERVAL_S) -> int:
    """Start our Prometheus for the cluster of `session`; its PID once it answers /-/ready."""
    exe = binary()
    if exe is None:
        raise UserError(INSTALL_HINT)
    if ready(prometheus):
        raise UserError(f"another Prometheus already answers on {prometheus.url}; stop it first")
    prometheus.folder.mkdir(parents=True, exist_ok=True)
    prometheus.config_path.write_text(config_text(session, interval_s))
    command = [exe, f"--config.file={prometheus.config_path}", f"--storage.tsdb.path={prometheus.folder / 'data'}",
               f"--storage.tsdb.retention.time={RETENTION}", f"--web.listen-address={HOST}:{prometheus.port}"]
    with open(prometheus.log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=prometheus.folder,
                                   start_new_session=True)  # not ended by a Ctrl-C meant for `rayfoundry up`
    prometheus.pid_path.write_text(str(process.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready(prometheus):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(prometheus)
            tail = prometheus.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise UserError(f"Prometheus did not start on {prometheus.url}: {' | '.join(tail)}")
        time.sleep(0.2)
    return process.pid


def stop(prometheus: Prometheus, timeout: float = 15.0) -> bool:
    """End our Prometheus (SIGTERM, then SIGKILL); False when it was not running."""
    running = pid(prometheus)
    prometheus.pid_path.unlink(missing_ok=True)
    if running is None:
        return False
    end_pids({running}, timeout)
    try:
        os.waitpid(running, 0)  # reaped, when this process started it
    except ChildProcessError:
        pass
    return True


def ensure(session: Path | None) -> str:
    """For `rayfoundry up`: the cluster's Prometheus running; a line saying so, or why not."""
    if binary() is None:
        return INSTALL_HINT
    if session is None:
        return "Prometheus not started: the cluster's session folder was not found"
    prometheus = of_session(session)
    if pid(prometheus) is not None:
        return f"Prometheus already running on {prometheus.url}"
    if ready(prometheus):
        return f"Prometheus not started: another one answers on {prometheus.url}"
    started = start(prometheus, session)
    return f"Prometheus {prometheus.url} (pid {started}) scrapes every node of the cluster every {SCRAPE_INTERVAL_S} s"


def query(url: str, expr: str, at: float | None = None) -> list[dict]:
    """An instant query through Prometheus's HTTP API: its result vector."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    return _api(url, "query", params)


def query_range(url: str, expr: str, start: float, end: float, step_s: float) -> list[dict]:
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
    return _api(url, "query_range", params)


def _api(url: str, endpoint: str, params: dict) -> list[dict]:
    request = f"{url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as error:  # a bad query: Prometheus says why in the body
        body = json.loads(error.read() or b"{}")
        raise UserError(f"Prometheus refused {params['query']!r}: {body.get('error', error)}") from None
    return body["data"]["result"]


def status(prometheus: Prometheus) -> dict:
    """For `rayfoundry status`."""
    if binary() is None:
        return {"installed": False}
    running = pid(prometheus)
    if running is None:
        return {"installed": True, "running": False}
    targets = _get(f"{prometheus.url}/api/v1/targets")["data"]["activeTargets"] if ready(prometheus) else []
    return {"installed": True, "running": True, "url": prometheus.url, "pid": running,
            "targets_up": sum(t["health"] == "up" for t in targets), "targets": len(targets)}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())
