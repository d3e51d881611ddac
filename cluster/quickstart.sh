#!/usr/bin/env bash
# The main command: install, start the local Ray cluster, add SmolLM2, prepare Shakespeare
# on the cluster as a Ray job, print SmolLM2's perplexity on it, then serve SmolLM2 on the
# cluster (OpenAI API on http://127.0.0.1:8000) and send it one chat request. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash cluster/install.sh
source .venv/bin/activate
set -x
rayfoundry up
export RAY_AUTH_MODE=token  # the cluster wants Ray's token (~/.ray/auth_token): Ray's clients send it when told
rayfoundry models add smollm2-135m-instruct
ray job submit --working-dir . -- python -m jobs.prepare_data --config configs/jobs/data_shakespeare.yaml
rayfoundry eval ppl --model smollm2-135m-instruct --data shakespeare --tokens 20480 --window 512
rayfoundry serve configs/serve/smollm2.yaml --detach
curl -sf http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \
  -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0}'
echo
