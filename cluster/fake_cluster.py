"""A fake multi-node autoscaling cluster on this machine (cluster/fake-multinode.yaml).

The head is `ray start --head --autoscaling-config=FILE` with RAY_FAKE_CLUSTER=1; its autoscaler
runs Ray's FakeMultiNodeProvider, which starts each worker "node" as local processes (a raylet
offering the node type's CPUs and logical GPUs) and ends them when they go idle. The cluster keeps
its own temp folder, so `stop` ends exactly its processes; its ports differ from the local
cluster's, so both can run at once. Token authentication and Serve API keys are on, as on a cloud.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from cluster import auth
from cluster.errors import UserError
from cluster.local_cluster import HOST, env_for_ray, ray_cli
from cluster.processes import end_processes_of, processes_of

PROVIDER_CLASS = "FakeMultiNodeProvider"
DASHBOARD_PORT = 8266
START_TIMEOUT_S = 120


def is_fake(config: dict) -> bool:
    provider = config.get("provider", {})
    return provider.get("type") == "fake_multinode" or str(provider.get("module", "")).endswith(PROVIDER_CLASS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class FakeCluster:
    def __init__(self, config_path: Path, dashboard_port: int = DASHBOARD_PORT):
        self.config_path = Path(config_path).resolve()
        self.config = yaml.safe_load(self.config_path.read_text())
        host, port = self.config["provider"]["gcs_address"].rsplit(":", 1)
        if host != HOST:
            raise UserError(f"{config_path}: provider.gcs_address must be on {HOST}, not {host}")
        self.gcs_port = int(port)
        self.dashboard_port = dashboard_port
        # Short: Ray's socket paths live under it and Unix sockets allow ~100 characters.
        self.temp_dir = Path(f"/tmp/rayfoundry-fake-{self.gcs_port}")

    @property
    def address(self) -> str:
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def _processes(self) -> re.Pattern:
        """What names one of this cluster's processes: its temp folder, or its GCS port as an --address."""
        return re.compile(rf"{re.escape(str(self.temp_dir))}|--address=\S+:{self.gcs_port}(\s|$)")

    def running(self) -> bool:
        return bool(processes_of(self._processes))

    def start(self) -> str:
        if self.running():
            return f"fake cluster already running; GCS {self.address}, dashboard {self.dashboard_url}"
        token = auth.ensure_token()
        result = subprocess.run(self._start_command(), env=self._env(), capture_output=True, text=True)
        if result.returncode != 0:
            self.stop()
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise UserError(f"`ray start` of the fake cluster failed: {' | '.join(tail)}")
        self._wait_for_dashboard()
        return (f"fake autoscaling cluster started: GCS {self.address}, dashboard {self.dashboard_url}; "
                f"worker types {', '.join(self._worker_types())} start as local processes on demand\n"
                + auth.HOW_TO_CONNECT.format(path=token))

    def stop(self) -> str:
        ended = end_processes_of(self._processes)
        return f"fake cluster stopped ({ended} processes)" if ended else "no fake cluster is running"

    def _worker_types(self) -> list[str]:
        return [name for name in self.config["available_node_types"] if name != self.config["head_node_type"]]

    def _start_command(self) -> list[str]:
        head = dict(self.config["available_node_types"][self.config["head_node_type"]]["resources"])
        command = [
            ray_cli(), "start", "--head", f"--autoscaling-config={self.config_path}",
            f"--node-ip-address={HOST}", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
            f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={head.pop('CPU', 0)}", f"--num-gpus={head.pop('GPU', 0)}", "--disable-usage-stats",
            # The local cluster holds Ray's default ports: every other one is chosen free.
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        return command + ([f"--resources={json.dumps(head)}"] if head else [])

    def _env(self) -> dict[str, str]:
        env = env_for_ray()
        auth.ensure_api_keys()
        # Every process of the cluster inherits these: its raylets, and the nodes its autoscaler starts.
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAYFOUNDRY_API_KEYS": ",".join(auth.api_keys())})
        return env

    def _wait_for_dashboard(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=auth.headers())
            try:
                urllib.request.urlopen(request, timeout=3).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        self.stop()
        raise UserError(f"the fake cluster's dashboard did not answer on {self.dashboard_url} in {START_TIMEOUT_S}s")

