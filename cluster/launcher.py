"""`rayfoundry up/down --cluster FILE`: thin faces over Ray's cluster launcher.

A cloud YAML (cluster/aws-gpu.yaml, cluster/gcp-gpu.yaml) goes to `ray up` / `ray down` as it is,
after the two files its file_mounts carry to every node exist here: Ray's auth token and the
Serve API keys. The fake multi-node YAML starts a head on this machine whose autoscaler launches
local "nodes" (cluster.fake_cluster). Either way the YAML first passes Ray's own validation.
"""
from __future__ import annotations

import copy
import logging
import subprocess
from pathlib import Path

import yaml

from cluster import auth
from cluster.errors import UserError
from cluster.fake_cluster import FakeCluster, is_fake
from cluster.local_cluster import env_for_ray, ray_cli


def load(path: Path) -> dict:
    """The YAML as written, after Ray's validation of it with its defaults filled in."""
    if not path.is_file():
        raise UserError(f"cluster YAML not found: {path}")
    config = yaml.safe_load(path.read_text())
    try:
        validate(config)
    except Exception as error:  # jsonschema's and Ray's own errors alike: the message says what is wrong
        raise UserError(f"{path} is not a valid Ray cluster config: {str(error).splitlines()[0]}") from None
    return config


def validate(config: dict) -> dict:
    """Ray's checks, as `ray up` makes them: defaults merged in (prepare_config), then the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    quiet = logging.getLogger("ray.autoscaler._private.util")  # it narrates every default it fills in
    level, quiet.level = quiet.level, logging.ERROR
    try:
        prepared = prepare_config(copy.deepcopy(config))
    finally:
        quiet.setLevel(level)
    validate_config(prepared)
    return prepared


def up(path: Path) -> str:
    config = load(path)
    if is_fake(config):
        return FakeCluster(path).start()
    token, keys = auth.ensure_token(), auth.ensure_api_keys()
    _launcher("up", path)
    return (f"cluster {config['cluster_name']!r} is up; Ray token from {token}, Serve API keys from {keys}.\n"
            f"Dashboard and job API: `ray dashboard {path}` (then http://127.0.0.1:8265, RAY_AUTH_MODE=token)")


def down(path: Path) -> str:
    config = load(path)
    if is_fake(config):
        return FakeCluster(path).stop()
    _launcher("down", path)
    return f"cluster {config['cluster_name']!r} is down"


def _launcher(verb: str, path: Path) -> None:
    """`ray up|down -y FILE` in the foreground: its own progress is the progress shown."""
    result = subprocess.run([ray_cli(), verb, "-y", str(path)], env=env_for_ray())
    if result.returncode != 0:
        raise UserError(f"`ray {verb} {path}` failed (exit {result.returncode}); its output is above")
