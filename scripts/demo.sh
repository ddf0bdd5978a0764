#!/usr/bin/env bash
# Set up, then run the main job on the built-in synthetic demo data; browse with `.venv/bin/mlflow ui`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# Offline (no DNS for the weights host): skip the Hugging Face download retries (~30 s) and go straight to
# the cache; without cached weights the demo then falls back to random CLIP weights, as it says.
if ! getent hosts huggingface.co >/dev/null 2>&1; then export HF_HUB_OFFLINE=1; fi
exec mlflow run . -e ensemble_mlp --env-manager local --experiment-name smp "$@"
