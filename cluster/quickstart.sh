#!/usr/bin/env bash
# The main command: install, start the local Ray cluster, add SmolLM2, prepare Shakespeare
# on the cluster as a Ray job, and print SmolLM2's perplexity on it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cluster/install.sh
source .venv/bin/activate
set -x
rayfoundry up
rayfoundry models add smollm2-135m-instruct
ray job submit --working-dir . -- python -m jobs.prepare_data --config configs/jobs/data_shakespeare.yaml
rayfoundry eval ppl --model smollm2-135m-instruct --data shakespeare --tokens 20480 --window 512
