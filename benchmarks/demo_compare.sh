#!/usr/bin/env bash
# The demo's seed-0 `compare` table made by a given checkout of smp, in a throwaway store, at full precision.
# Usage: bash benchmarks/demo_compare.sh TREE OUT   (TREE: a checkout, e.g. a `git worktree add` of an older
# commit; OUT: a new directory). Writes OUT/compare.csv; compare two with benchmarks/compare_tables.py.
set -euo pipefail
tree=$(cd "$1" && pwd)
mkdir -p "$2" && out=$(cd "$2" && pwd)
py=${SMP_PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
cd "$out"
export PYTHONPATH=$tree HF_HUB_OFFLINE=1 MLFLOW_TRACKING_URI=sqlite:///$out/mlflow.db
for job in ensemble_mlp ensemble_conv1d pca_boost; do "$py" -m smp.cli "$job" --experiment cmp; done
"$py" -m smp.cli compare --experiment cmp
cp "$(find "$out/mlruns" -name compare.csv | head -n 1)" "$out/compare.csv"
