#!/usr/bin/env bash
# Install rayfoundry into ./.venv (created if missing), with its test extras.
# torch is installed first as 2.13.0: the project accepts any torch in its range, and asking for that
# exact release keeps pip from pulling another multi-GB build. Which build: on this project's machines
# pip takes the CPU wheel on disk; elsewhere PyPI's Linux wheel (the CUDA build, for GPU nodes), or the
# index TORCH_INDEX_URL names (https://download.pytorch.org/whl/cpu for CPU-only nodes).
# TORCH_SPEC overrides the requirement itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  echo "GPUs here: $(nvidia-smi -L | wc -l)"
fi
echo "installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} ..."
pip install "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
echo "installing rayfoundry and its dependencies (ray, deepspeed, transformers, ...) ..."
pip install -e '.[test]'
echo "installed: $(.venv/bin/rayfoundry --help >/dev/null && echo rayfoundry) into .venv"

# Prometheus, which `rayfoundry up` starts beside the cluster: the Debian package where apt can install it.
if command -v prometheus >/dev/null; then
  echo "Prometheus: $(command -v prometheus)"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing Prometheus (Debian package) ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
    >/dev/null 2>&1 || echo "note: apt-get could not install prometheus; rayfoundry up runs without it"
else
  echo "note: Prometheus not found; install it (sudo apt-get install prometheus, or a release from" \
       "https://prometheus.io/download/) for rayfoundry up to start one"
fi
