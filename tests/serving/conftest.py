"""One local Ray with Serve for every test in this folder: each module deploys its application on it
and deletes it afterwards, instead of starting and stopping a Ray of its own."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from conftest import free_port, ray_auth_mode

# The settings every module here needs, set once for all of them:
PROCESS_ENV = {
    "RAY_metrics_report_interval_ms": "500",  # metrics reach Ray's endpoint in 0.5 s instead of 10
}
WORKER_ENV = {
    "RAYFOUNDRY_API_KEYS": "",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",  # autoscaling reacts in seconds
}
NUM_CPUS = 4  # logical: the largest application here (test_serve_app's) needs 3


@dataclass(frozen=True)
class ServeCluster:
    url: str  # Serve's HTTP, on loopback
    port: int
    metrics_port: int  # Ray's Prometheus endpoint


@pytest.fixture(scope="package")
def serve_cluster(smollm2_home) -> Iterator[ServeCluster]:
    """The local Ray + Serve; its workers read the SmolLM2 test store (RAYFOUNDRY_HOME)."""
    import ray
    from ray import serve

    previous = {key: os.environ.get(key) for key in PROCESS_ENV}
    os.environ.update(PROCESS_ENV)
    metrics_port, port = free_port(), free_port()
    try:
        with ray_auth_mode("disabled"):  # a private Ray on loopback
            ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False,
                     _metrics_export_port=metrics_port,
                     runtime_env={"env_vars": {**WORKER_ENV, "RAYFOUNDRY_HOME": str(smollm2_home)}})
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                yield ServeCluster(f"http://127.0.0.1:{port}", port, metrics_port)
            finally:
                serve.shutdown()
                ray.shutdown()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def deployed(app, name: str, route_prefix: str = "/") -> Iterator[None]:
    """`serve.run` of an application, deleted afterwards so the next module can take its route."""
    from ray import serve

    serve.run(app, name=name, route_prefix=route_prefix)
    try:
        yield
    finally:
        serve.delete(name)
