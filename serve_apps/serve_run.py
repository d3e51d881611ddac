"""`rayfoundry serve CONFIG [--detach]`: check a Serve config's rayfoundry apps, then `serve run`
it in the foreground, or with --detach `serve deploy` it to the running cluster and wait until
every application is RUNNING and answers /health.

Bad arguments fail here in one line (exit 2) instead of inside a Serve replica's traceback.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from cluster import auth
from cluster.config import parse_config
from cluster.errors import UserError, reports_user_errors
from cluster.local_cluster import dashboard_url
from serve_apps.app import ServeAppConfig

IMPORT_PATH = "serve_apps.app:build_app"
DEPLOY_TIMEOUT_S = 600  # a fresh machine also builds the C++ kernels in the first replica


def check(path: Path) -> int:
    """Validate every application of ours in the file; returns how many there are."""
    if not path.is_file():
        raise UserError(f"serve config not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    apps = [app for app in config.get("applications", []) if app.get("import_path") == IMPORT_PATH]
    for app in apps:
        parse_config(ServeAppConfig, app.get("args") or {}, f"{path}: application {app.get('name')!r}")
    return len(apps)


def _get_json(url: str):
    with urllib.request.urlopen(urllib.request.Request(url, headers=auth.headers()), timeout=10) as response:
        return json.loads(response.read())


def _app_statuses() -> dict[str, str]:
    """Application name -> Serve status, from the dashboard's Serve REST API."""
    details = _get_json(f"{dashboard_url()}/api/serve/applications/")
    return {name: app["status"] for name, app in (details.get("applications") or {}).items()}


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_serving(config_path: Path, timeout_s: float = DEPLOY_TIMEOUT_S) -> str:
    """Block until every application in the file is RUNNING and /health answers; returns the URL."""
    config = yaml.safe_load(config_path.read_text()) or {}
    http = config.get("http_options") or {}
    base_url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    names = [app.get("name", "default") for app in config.get("applications", [])]
    deadline, statuses = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        statuses = _app_statuses()
        failed = [n for n in names if statuses.get(n) in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise UserError(f"Serve could not deploy {failed}: see `serve status` and "
                            "/tmp/ray/session_latest/logs/serve/")
        if all(statuses.get(n) == "RUNNING" for n in names) and _healthy(base_url):
            return base_url
        time.sleep(2)
    raise UserError(f"not serving after {timeout_s:.0f}s (statuses: {statuses}); see `serve status`")


def _serve_cli() -> str:
    """Serve's CLI next to this interpreter."""
    return str(Path(sys.executable).with_name("serve"))


def deploy(config_path: Path) -> str:
    auth.use_for(dashboard_url())  # `serve deploy` sends the token only when told to
    result = subprocess.run([_serve_cli(), "deploy", str(config_path), "--address", dashboard_url()],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`serve deploy` failed (is the cluster up? `rayfoundry up`): "
                        f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return wait_until_serving(config_path)


@reports_user_errors("rayfoundry serve")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rayfoundry serve", description="serve models from a Serve config: in the foreground, or with --detach")
    parser.add_argument("config", type=Path, help="a Serve config file, e.g. configs/serve/smollm2.yaml")
    parser.add_argument("--detach", action="store_true",
                        help="deploy to the running cluster (`serve deploy`), wait until it serves, return")
    args = parser.parse_args(argv)
    if check(args.config) == 0:
        raise UserError(f"{args.config}: no application with import_path {IMPORT_PATH}")
    if args.detach:
        print(f"serving on {deploy(args.config)} (`serve shutdown -y` stops it)")
        return 0
    return subprocess.run([_serve_cli(), "run", str(args.config)]).returncode


if __name__ == "__main__":
    sys.exit(main())
