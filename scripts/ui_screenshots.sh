#!/usr/bin/env bash
# Retake the pictures in docs/ui/ (see docs/ui.md) on the current code: for the docs, not for CI.
#
#   bash scripts/ui_screenshots.sh
#
# Builds the demo store with the current code in a new temporary directory (mlflow.db, mlruns/, optuna.db,
# .smp_cache/; the repository root is left alone): `mlflow run` of ensemble_mlp, tune (benchmark, 10 trials)
# and promote on the built-in demo data, about 16 minutes on 2 CPU cores, 12 of them ensemble_mlp embedding
# the 2,000 demo images. SMP_UI_STORE=DIR uses (and completes) the store in DIR instead, e.g. the one a
# previous call printed, to retake the pictures without rebuilding.
# Starts `mlflow server` and optuna-dashboard on loopback, shoots each page with headless Chromium from a new,
# empty browser profile each time (what a first visit shows: MLflow's default columns and charts; about a
# minute), writes docs/ui/*.png and stops both servers on exit.
# Env: SMP_UI_STORE (a new temporary directory), SMP_UI_MLFLOW_PORT (5055), SMP_UI_DASHBOARD_PORT (8085),
#      CHROMIUM (/usr/bin/chromium), SMP_UI_EXPERIMENT (experiment of the demo jobs, smp),
#      SMP_UI_OUT (docs/ui), plus the page choices of
#      scripts/ui_screenshots.py (SMP_UI_RUN_ID, SMP_UI_MODEL, SMP_UI_STUDY).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
MLFLOW_PORT=${SMP_UI_MLFLOW_PORT:-5055}
DASH_PORT=${SMP_UI_DASHBOARD_PORT:-8085}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
OUT=${SMP_UI_OUT:-docs/ui}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export SMP_UI_MODEL=${SMP_UI_MODEL:-smp-popularity}
EXPERIMENT=${SMP_UI_EXPERIMENT:-smp}  # for the demo jobs (the launcher would otherwise pick MLflow's Default)
HELPER=$REPO/scripts/ui_screenshots.py
if [ -n "${SMP_UI_STORE:-}" ]; then
  mkdir -p "$SMP_UI_STORE"
  STORE=$(cd "$SMP_UI_STORE" && pwd)
else
  STORE=$(mktemp -d "${TMPDIR:-/tmp}/smp-ui-store.XXXXXX")
fi
echo "demo store: $STORE"
# the store and the jobs' caches live in $STORE, whatever the shell was pointed at
cd "$STORE"
export MLFLOW_TRACKING_URI="sqlite:///$STORE/mlflow.db"
export SMP_CACHE_DIR=${SMP_CACHE_DIR:-$STORE/.smp_cache}
unset MLFLOW_EXPERIMENT_NAME MLFLOW_EXPERIMENT_ID MLFLOW_RUN_ID
export MLFLOW_DISABLE_TELEMETRY=true
# offline (no DNS for the weights host): no Hugging Face retries, random CLIP weights as the demo says
if ! getent hosts huggingface.co >/dev/null 2>&1; then export HF_HUB_OFFLINE=1; fi

command -v mlflow >/dev/null || { echo "mlflow not on PATH (bash scripts/setup.sh)" >&2; exit 1; }
command -v optuna-dashboard >/dev/null \
  || { echo "optuna-dashboard not installed: pip install optuna-dashboard" >&2; exit 1; }
[ -x "$CHROMIUM" ] || { echo "no Chromium at $CHROMIUM (set CHROMIUM=...)" >&2; exit 1; }
for port in "$MLFLOW_PORT" "$DASH_PORT"; do
  if python -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $port)) != 0)"; then
    echo "port $port on 127.0.0.1 is in use (set SMP_UI_MLFLOW_PORT / SMP_UI_DASHBOARD_PORT)" >&2; exit 1
  fi
done

# 1. the demo store (mlflow run from $STORE: the experiment's artifacts go to $STORE/mlruns)
for job in $(python "$HELPER" missing); do
  echo "== demo job: $job ($(date +%T))"
  case "$job" in
    ensemble_mlp) mlflow run "$REPO" -e ensemble_mlp --env-manager local --experiment-name "$EXPERIMENT" ;;
    tune) mlflow run "$REPO" -e tune --env-manager local --experiment-name "$EXPERIMENT" \
            -P model=benchmark -P n_trials=10 ;;
    promote) mlflow run "$REPO" -e promote --env-manager local --experiment-name "$EXPERIMENT" \
               -P model_name="$SMP_UI_MODEL" ;;
  esac
done
echo "== demo store ready ($(date +%T))"

# 2. the servers (each in its own process group, so the trap stops its workers too)
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/smp-ui-logs.XXXXXX")
PROFILES=$(mktemp -d "${TMPDIR:-/tmp}/smp-ui-profiles.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$PROFILES"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
DASH_URL=http://127.0.0.1:$DASH_PORT

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --backend-store-uri "sqlite:///$STORE/mlflow.db" \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$LOGS/mlflow.log" 2>&1 &
pids+=($!)
# wsgiref: one process (gunicorn, its default when installed, also keeps a control socket in ~/.gunicorn)
setsid optuna-dashboard "sqlite:///$STORE/optuna.db" --host 127.0.0.1 --port "$DASH_PORT" --server wsgiref \
  >"$LOGS/optuna-dashboard.log" 2>&1 &
pids+=($!)
python "$HELPER" wait "$MLFLOW_URL/health" 180 || { cat "$LOGS/mlflow.log" >&2; exit 1; }
python "$HELPER" wait "$DASH_URL/api/meta" 60 || { cat "$LOGS/optuna-dashboard.log" >&2; exit 1; }

# 3. the pictures, each from a new, empty browser profile (no settings, no local storage left by another page),
#    after what a reader would do there (ACTIONS in the helper: close MLflow's Assistant panel, which opens
#    itself on a first visit; unfold the nested runs; type a chart filter; unfold the model's schema)
python "$HELPER" pages "$MLFLOW_URL" "$DASH_URL" >"$LOGS/pages.tsv"
n=0
while IFS=$'\t' read -r name url size actions; do
  echo "$OUT/$name.png  <-  $url"
  rm -f "$OUT/$name.png"
  n=$((n + 1))
  profile="$PROFILES/$n"
  mkdir "$profile"
  CHROMIUM="$CHROMIUM" python "$HELPER" shot "$profile" "$url" "$OUT/$name.png" "$size" "$actions" \
    >"$LOGS/chromium-$name.log" 2>&1 </dev/null \
    || { echo "could not take $url:" >&2; tail -5 "$LOGS/chromium-$name.log" >&2; exit 1; }
  cat "$LOGS/chromium-$name.log"
  rm -rf "$profile"
  [ -s "$OUT/$name.png" ] || { echo "no screenshot for $url" >&2; exit 1; }
done <"$LOGS/pages.tsv"
echo "done: $(ls "$OUT"/*.png | wc -l) pictures in $OUT (store in $STORE, server logs in $LOGS)"
