#!/usr/bin/env bash
# Install rayfoundry into ./.venv (created if missing), with its test extras.
# torch is installed first as the CPU build 2.13.0: the project accepts any torch in its
# range, and asking for that exact release keeps pip from pulling a multi-GB CUDA build.
# Override with TORCH_SPEC, e.g. TORCH_SPEC='torch==2.13.0' on a machine with a GPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2); }
echo "installing $TORCH_SPEC ..."
pip install "$TORCH_SPEC"
echo "installing rayfoundry and its dependencies (ray, deepspeed, transformers, ...) ..."
pip install -e '.[test]'
echo "installed: $(.venv/bin/rayfoundry --help >/dev/null && echo rayfoundry) into .venv"
