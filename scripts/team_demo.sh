#!/usr/bin/env bash
# Team mode end to end, on this machine only (127.0.0.1, free ports, throwaway directories):
#   PostgreSQL -> `mlflow server` (runs + registry in PostgreSQL, artifacts in a directory it serves)
#   -> a 3-worker Optuna study on the same PostgreSQL -> promote the best model to @champion
#   -> `mlflow models serve` it -> one request -> stop everything it started (also on error or Ctrl-C).
#
#   bash scripts/team_demo.sh            # about 3-6 minutes on 2 cores
#   KEEP=1 bash scripts/team_demo.sh     # keep the work directory (logs, artifacts) afterwards
#   WORKERS=2 TRIALS=3 bash scripts/team_demo.sh
#
# Needs PostgreSQL's server binaries (Debian/Ubuntu: `apt-get install -y postgresql`; see scripts/pg.sh)
# and psycopg2 (`pip install -e .[team]`, done here if it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
py=$PWD/.venv/bin/python
python -c "import psycopg2" 2>/dev/null || python -m pip install --quiet -e ".[team]"
bash scripts/pg.sh bindir >/dev/null || exit 1

workers=${WORKERS:-3}
trials=${TRIALS:-2}
model_name=smp-popularity
experiment=team-demo

work=$(mktemp -d /tmp/smp-team.XXXXXX)
chmod 755 "$work"  # PostgreSQL's user must reach $work/pg
log() { printf '\n== %s\n' "$*"; }
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() {  # URL SECONDS LOGFILE: wait until URL answers 200, or fail showing the log
  "$py" - "$1" "$2" <<'EOF' || { echo "no answer from $1; last lines of $3:" >&2; tail -n 30 "$3" >&2; return 1; }
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(1)
EOF
}

server_pid="" serve_pid=""
cleanup() {
  status=$?
  trap - EXIT INT TERM
  log "stopping everything this script started"
  # both servers were started by setsid: each leads its own process group (uvicorn/gunicorn workers included)
  for pid in $serve_pid $server_pid; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in $serve_pid $server_pid; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  bash scripts/pg.sh stop "$work/pg" || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pg_port=$(free_port)
log "PostgreSQL on 127.0.0.1:$pg_port (data in $work/pg)"
pg=$(bash scripts/pg.sh start "$work/pg" "$pg_port")

mlflow_port=$(free_port)
log "mlflow server on http://127.0.0.1:$mlflow_port (backend $pg/smp, artifacts $work/artifacts)"
# no GenAI job runner: smp runs no server-side jobs (it would start 7 huey processes, ~1.6 GB) -- docs/team.md
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --backend-store-uri "$pg/smp" --artifacts-destination "$work/artifacts" \
  --host 127.0.0.1 --port "$mlflow_port" --workers 2 --gunicorn-opts "--timeout 120" \
  >"$work/mlflow-server.log" 2>&1 &
server_pid=$!
wait_http "http://127.0.0.1:$mlflow_port/health" 300 "$work/mlflow-server.log"  # first start creates the schema

# every entry point now tracks to the server; the Optuna study lives in the same PostgreSQL
export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port
# bounded retries: a server restart is ridden out, a server that stays down fails in about a minute
export MLFLOW_HTTP_REQUEST_MAX_RETRIES=6 MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1 MLFLOW_HTTP_REQUEST_TIMEOUT=60
python -c "from smp.synth import demo_data_dir; demo_data_dir()"  # generate the demo data once, not per worker

log "Optuna study: $workers workers x $trials trials (benchmark model, demo data, 600 posts)"
bash scripts/tune_workers.sh "$workers" --model benchmark --data demo --sample-size 600 --n-trials "$trials" \
  --study-name team-demo --storage "$pg/optuna" --heartbeat 10 --experiment "$experiment"

log "promote the best model run to $model_name@champion"
python -m smp.cli promote --experiment "$experiment" --model-name "$model_name"

serve_port=$(free_port)
log "mlflow models serve -m models:/$model_name@champion on http://127.0.0.1:$serve_port"
setsid mlflow models serve -m "models:/$model_name@champion" --env-manager local -h 127.0.0.1 -p "$serve_port" \
  >"$work/serve.log" 2>&1 &
serve_pid=$!
wait_http "http://127.0.0.1:$serve_port/ping" 180 "$work/serve.log"

log "one request (the model's own serving example)"
"$py" - "$model_name" "$serve_port" "$work/champion" <<'EOF'
import json, sys, urllib.request

import mlflow

name, port, dst = sys.argv[1], sys.argv[2], sys.argv[3]
version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=dst)
body = open(f"{local}/serving_input_example.json", "rb").read()
req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    answer = json.load(r)
rows = len(json.loads(body)["dataframe_split"]["data"])
print(f"{name} v{version.version} (@champion, run {version.run_id}) predicted {rows} posts:",
      json.dumps(answer)[:300])
EOF
log "done: the study, its runs and the registered model were in $work (removed on exit unless KEEP=1)"
