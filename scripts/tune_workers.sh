#!/usr/bin/env bash
# Run one Optuna study with N worker processes:  scripts/tune_workers.sh N [smp tune args...]
#
#   MLFLOW_TRACKING_URI=http://mlflow.team:5000 \
#   scripts/tune_workers.sh 4 --model benchmark --study-name bench-v1 --n-trials 10 \
#       --storage postgresql+psycopg2://smp@db.team/optuna --experiment tune
#
# First `smp tune ... --n-trials 0` creates the study and its parent MLflow run (or finds them: the same
# study name continues a study), then N workers `smp tune ... --parent-run <id>` share it; each runs
# --n-trials trials (use --max-trials to cap the study as a whole).  Worker i gets --sampler-seed
# SEED+i, so the workers' seeded samplers do not propose the same parameters.  Output lines are
# prefixed with [wI].  Several machines may run this same command against the same --storage and
# MLFLOW_TRACKING_URI: a study name that exists already is continued under its parent run.
# The storage must be shared by every worker: a server database (postgresql+psycopg2://...), or
# journal:PATH / sqlite on one machine; the default (sqlite beside the MLflow store) is only for one machine.
# Exit status: 0 when every worker succeeded, else 1 (the failed workers are listed).
# Python: $PYTHON, else ./.venv/bin/python of this checkout, else python3.
# Defaults (each only when unset): OMP_NUM_THREADS = cores / N, so N XGBoost workers do not oversubscribe
# the CPUs (4 workers x all cores ran 4x slower on 2 cores); MLFLOW_DISABLE_TELEMETRY=true (MLflow 3.17's
# telemetry thread, when it cannot reach its endpoint, deletes an environment variable while requests
# iterates os.environ: an occasional KeyError '_MLFLOW_TELEMETRY_SESSION_ID' against a tracking server).
set -euo pipefail

usage() { echo "usage: $0 N [smp tune args...]   (N >= 1 workers)" >&2; exit 2; }
[ $# -ge 1 ] || usage
n=$1; shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
fi

if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=$(( cores / n > 0 ? cores / n : 1 ))
fi
export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}

# the sampler seed the user asked for (the last --sampler-seed wins, as in argparse)
seed=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --sampler-seed=*|--sampler_seed=*) seed=${args[$i]#*=} ;;
    --sampler-seed|--sampler_seed) seed=${args[$((i + 1))]:-0} ;;
  esac
done
[[ "$seed" =~ ^[0-9]+$ ]] || { echo "$0: --sampler-seed must be a non-negative integer" >&2; exit 2; }

init=$("$py" -m smp.cli tune "$@" --n-trials 0) || { echo "$init" >&2; echo "$0: creating the study failed" >&2; exit 1; }
echo "$init"
parent=$(sed -n 's/.*parent run \([0-9a-zA-Z]*\).*/\1/p' <<<"$init" | tail -n 1)
[ -n "$parent" ] || { echo "$0: no 'parent run <id>' in the output above" >&2; exit 1; }
echo "parent run $parent: starting $n workers"

pids=()
stop() {  # Ctrl-C / kill: stop the workers this script started, then wait for them
  trap - INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait
  exit 130
}
trap stop INT TERM

for ((i = 0; i < n; i++)); do
  "$py" -m smp.cli tune "$@" --parent-run "$parent" --sampler-seed $((seed + i)) \
    > >(sed -u "s/^/[w$i] /") 2>&1 &
  pids+=("$!")
done

failed=()
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}" || failed+=("w$i (exit $?)")
done
wait  # the output filters
if [ ${#failed[@]} -gt 0 ]; then
  echo "$0: failed workers: ${failed[*]}" >&2
  exit 1
fi
echo "all $n workers finished (study parent run $parent)"
