"""`rayfoundry serve CONFIG`: check a Serve config's rayfoundry apps, then `serve run` it.

Bad arguments fail here in one line (exit 2) instead of inside a Serve replica's traceback.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.config import parse_config
from cluster.errors import UserError, reports_user_errors
from serve_apps.app import ServeAppConfig

IMPORT_PATH = "serve_apps.app:build_app"


def check(path: Path) -> int:
    """Validate every application of ours in the file; returns how many there are."""
    if not path.is_file():
        raise UserError(f"serve config not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    apps = [app for app in config.get("applications", []) if app.get("import_path") == IMPORT_PATH]
    for app in apps:
        parse_config(ServeAppConfig, app.get("args") or {}, f"{path}: application {app.get('name')!r}")
    return len(apps)


@reports_user_errors("rayfoundry serve")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayfoundry serve", description="serve models until Ctrl-C")
    parser.add_argument("config", type=Path, help="a Serve config file, e.g. configs/serve/smollm2.yaml")
    args = parser.parse_args(argv)
    if check(args.config) == 0:
        raise UserError(f"{args.config}: no application with import_path {IMPORT_PATH}")
    return subprocess.run([str(Path(sys.executable).with_name("serve")), "run", str(args.config)]).returncode


if __name__ == "__main__":
    sys.exit(main())
