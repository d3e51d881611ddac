"""The HTTP side stays light: importing the ingress or the Serve app builder loads no torch and no
model code (the engine loads in the LLMServer replicas only)."""
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ["torch", "serve_apps.engine.model_runner"]


@pytest.mark.parametrize("module", ["serve_apps.ingress", "serve_apps.app"])
def test_importing_loads_no_torch(module):
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
