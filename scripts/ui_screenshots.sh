#!/usr/bin/env bash
# Retake the pictures in docs/ui/ (see docs/ui.md) from the demo store: for the docs, not for CI.
#
#   bash scripts/ui_screenshots.sh
#
# Uses mlflow.db / optuna.db in the repository root; if they lack a training run, a study or a
# @champion, runs the demo jobs first (about 12 minutes on 2 CPU cores, most of it ensemble_mlp's embedding).
# Starts `mlflow server` and optuna-dashboard on loopback, shoots each page with headless Chromium
# (about a minute), writes docs/ui/*.png and stops both servers on exit.
# Env: SMP_UI_MLFLOW_PORT (5055), SMP_UI_DASHBOARD_PORT (8085), CHROMIUM (/usr/bin/chromium),
#      SMP_UI_EXPERIMENT (experiment of the demo jobs, smp),
#      SMP_UI_BUDGET_MS (virtual time per page, 20000), SMP_UI_OUT (docs/ui), plus the page choices of
#      scripts/ui_screenshots.py (SMP_UI_RUN_ID, SMP_UI_MODEL, SMP_UI_STUDY, SMP_UI_METRICS, SMP_UI_CHART_FILTER).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
MLFLOW_PORT=${SMP_UI_MLFLOW_PORT:-5055}
DASH_PORT=${SMP_UI_DASHBOARD_PORT:-8085}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
BUDGET=${SMP_UI_BUDGET_MS:-20000}
OUT=${SMP_UI_OUT:-docs/ui}
export SMP_UI_MODEL=${SMP_UI_MODEL:-smp-popularity}
EXPERIMENT=${SMP_UI_EXPERIMENT:-smp}  # for the demo jobs (the launcher would otherwise pick MLflow's Default)
HELPER=scripts/ui_screenshots.py
# the demo store in this directory, whatever the shell was pointed at
export MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db"
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

# 1. the demo store
for job in $(python "$HELPER" missing); do
  echo "== demo job: $job"
  case "$job" in
    ensemble_mlp) mlflow run . -e ensemble_mlp --env-manager local --experiment-name "$EXPERIMENT" ;;
    tune) mlflow run . -e tune --env-manager local --experiment-name "$EXPERIMENT" \
            -P model=benchmark -P n_trials=3 ;;
    promote) mlflow run . -e promote --env-manager local --experiment-name "$EXPERIMENT" \
               -P model_name="$SMP_UI_MODEL" ;;
  esac
done

# 2. the servers (each in its own process group, so the trap stops its workers too)
LOGS=$(mktemp -d)
PROFILE=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$PROFILE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
DASH_URL=http://127.0.0.1:$DASH_PORT
chrome=("$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync --user-data-dir="$PROFILE"
  --hide-scrollbars --run-all-compositor-stages-before-draw)
# (without --run-all-compositor-stages-before-draw the metric charts, drawn once they scroll into view,
#  stay spinners whatever the virtual time budget)

# the browser profile's MLflow UI settings, stored from the server's origin before it starts (seed_items in
# the helper): "Model training" sidebar, Assistant panel closed, metric columns in the runs list, the run's
# learning curves on its charts tab
setsid python "$HELPER" seed-server "$MLFLOW_PORT" >"$LOGS/seed.log" 2>&1 &
seed_pid=$!
pids+=("$seed_pid")
python "$HELPER" wait "$MLFLOW_URL/seed" 60 || { cat "$LOGS/seed.log" >&2; exit 1; }
"${chrome[@]}" --dump-dom "$MLFLOW_URL/seed" 2>"$LOGS/chromium-seed.log" </dev/null | grep -q "seeded" \
  || { echo "could not seed the browser profile:" >&2; tail -20 "$LOGS/chromium-seed.log" >&2; exit 1; }
kill -TERM -- "-$seed_pid"; wait "$seed_pid" 2>/dev/null || true
pids=()

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --backend-store-uri sqlite:///mlflow.db \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$LOGS/mlflow.log" 2>&1 &
pids+=($!)
# wsgiref: one process (gunicorn, its default when installed, also keeps a control socket in ~/.gunicorn)
setsid optuna-dashboard sqlite:///optuna.db --host 127.0.0.1 --port "$DASH_PORT" --server wsgiref \
  >"$LOGS/optuna-dashboard.log" 2>&1 &
pids+=($!)
python "$HELPER" wait "$MLFLOW_URL/health" 180 || { cat "$LOGS/mlflow.log" >&2; exit 1; }
python "$HELPER" wait "$DASH_URL/api/meta" 60 || { cat "$LOGS/optuna-dashboard.log" >&2; exit 1; }

# 3. the pictures
mkdir -p "$OUT"
python "$HELPER" pages "$MLFLOW_URL" "$DASH_URL" >"$LOGS/pages.tsv"
while IFS=$'\t' read -r name url; do
  echo "$OUT/$name.png  <-  $url"
  rm -f "$OUT/$name.png"
  if [ "$name" = mlflow_model_version ]; then
    # the schema opens collapsed: click "Inputs (N)" and "Outputs (N)" first (DevTools protocol); tall enough
    # for every input row
    CHROMIUM="$CHROMIUM" python "$HELPER" click-shot "$PROFILE" "$url" "$OUT/$name.png" 1600,2400 \
      '^(Inputs|Outputs) \([0-9]+\)$' >"$LOGS/chromium-$name.log" 2>&1 </dev/null \
      || { echo "  (could not expand the schema: $(tail -1 "$LOGS/chromium-$name.log"); taking it collapsed)"
           "${chrome[@]}" --window-size=1600,1300 --virtual-time-budget="$BUDGET" --screenshot="$OUT/$name.png" \
             "$url" >>"$LOGS/chromium-$name.log" 2>&1 </dev/null || true; }
  else
    "${chrome[@]}" --window-size=1600,1000 --virtual-time-budget="$BUDGET" --screenshot="$OUT/$name.png" "$url" \
      >"$LOGS/chromium-$name.log" 2>&1 </dev/null || true
  fi
  [ -s "$OUT/$name.png" ] || { echo "no screenshot for $url:" >&2; tail -20 "$LOGS/chromium-$name.log" >&2; exit 1; }
done <"$LOGS/pages.tsv"
echo "done: $(ls "$OUT"/*.png | wc -l) pictures in $OUT (server logs in $LOGS)"
