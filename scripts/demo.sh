#!/usr/bin/env bash
# Set up, then run the main job on the built-in synthetic demo data; browse with `.venv/bin/mlflow ui`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec mlflow run . -e ensemble_mlp --env-manager local "$@"
