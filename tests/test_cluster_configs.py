"""The cluster YAMLs pass Ray's own validation (as `ray up` makes it); the KubeRay manifests parse,
name the Ray version the project installs and serve exactly a configs/serve/ file's applications.
No cloud and no Kubernetes API can be reached here: these check the files against Ray's schema and
KubeRay's published field names, not a live launch."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import ray
import yaml

from cluster import launcher
from cluster.config import parse_config
from conftest import RAYFOUNDRY, REPO, run
from serve_apps.app import ServeAppConfig

CLOUD_YAMLS = ["cluster/aws-gpu.yaml", "cluster/gcp-gpu.yaml"]
ALL_YAMLS = [*CLOUD_YAMLS, "cluster/fake-multinode.yaml"]
MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def load(path: str | Path) -> dict:
    return yaml.safe_load((REPO / path).read_text())


@pytest.mark.parametrize("path", ALL_YAMLS)
def test_cluster_yaml_passes_rays_validation(path):
    prepared = launcher.validate(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(head_count=1),                          # a key Ray's schema does not have
    lambda c: c["available_node_types"].pop(c["head_node_type"]),  # no head type
    lambda c: c.update(idle_timeout_minutes="soon"),           # a wrong type
])
def test_the_same_validation_refuses_a_broken_yaml(break_it):
    config = copy.deepcopy(load("cluster/aws-gpu.yaml"))
    break_it(config)
    with pytest.raises(Exception):
        launcher.validate(config)


def test_rayfoundry_up_refuses_an_invalid_yaml_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**load("cluster/aws-gpu.yaml"), "head_count": 1}))
    result = run([*RAYFOUNDRY, "up", "--cluster", str(bad)], dict(os.environ), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a valid Ray cluster config" in result.stderr


@pytest.mark.parametrize("path", CLOUD_YAMLS)
def test_cloud_yaml_head_hosts_no_replicas_gpu_workers_from_zero_and_auth_on(path):
    config = load(path)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["resources"]["GPU"] >= 1 for t in workers)
    assert config["idle_timeout_minutes"] > 0 and config["provider"].get("cache_stopped_nodes", False) is False
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    started = [c for c in starts if "ray start" in c]
    assert len(started) == 2 and all("RAY_AUTH_MODE=token" in c and "RAYFOUNDRY_API_KEYS" in c for c in started)
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    assert {"~/.ray/auth_token", "~/.rayfoundry/api_keys", "~/rayfoundry"} <= set(config["file_mounts"])
    setup = config["head_setup_commands"] + config["worker_setup_commands"]
    assert sum("cluster/install.sh" in c for c in setup) == 2


def installed_ray_version() -> str:
    pinned = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml pins no Ray version"
    assert pinned.group(1) == ray.__version__
    return ray.__version__


def ray_clusters(manifest: dict) -> list[dict]:
    """The RayCluster spec a manifest carries, whatever its kind."""
    spec = manifest["spec"]
    return [{"RayCluster": spec, "RayService": spec.get("rayClusterConfig"), "RayJob": spec.get("rayClusterSpec")}
            [manifest["kind"]]]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_names_our_ray_autoscaler_v2_token_auth_and_workers_from_zero(path):
    (manifest,) = yaml.safe_load_all(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] in ("RayCluster", "RayService", "RayJob")
    version = installed_ray_version()
    for cluster in ray_clusters(manifest):
        assert cluster["rayVersion"] == version
        assert cluster["authOptions"] == {"mode": "token"}
        assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert all(g["minReplicas"] == 0 and g["replicas"] == 0 for g in cluster["workerGroupSpecs"])
    dockerfile = (REPO / "cluster" / "kuberay" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-py311-gpu" in dockerfile


def test_ray_service_serves_exactly_the_applications_of_its_serve_config():
    service = yaml.safe_load((REPO / "cluster" / "kuberay" / "ray-service.yaml").read_text())
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    source = load("configs/serve/smollm2-autoscale.yaml")
    assert served == {"applications": source["applications"]}, \
        "copy configs/serve/smollm2-autoscale.yaml's applications into ray-service.yaml's serveConfigV2"
    for app in served["applications"]:
        parse_config(ServeAppConfig, app["args"], "serveConfigV2")
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(e["name"] == "RAYFOUNDRY_API_KEYS" and "secretKeyRef" in e["valueFrom"] for e in worker["env"])
