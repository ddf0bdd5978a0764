#!/bin/sh
# `python` for the MLproject commands (`sh entrypoints/python.sh entrypoints/run.py NAME ARGS`): runs the entry
# point with a Python that has smp installed, whatever PATH holds.
#
# `mlflow run` runs each command with bash in the project directory. Under --env-manager uv, virtualenv or
# conda, the environment MLflow built is active there and `python` is its Python. Under --env-manager local
# the shell keeps the caller's PATH: from a plain shell (`.venv/bin/mlflow run ...`, nothing activated)
# `python` is the system one, without smp. The first of these with smp installed runs the script:
#   $SMP_PYTHON (taken as given); `python` on PATH; the Python that runs `mlflow run` (read from /proc,
#   Linux); this checkout's .venv (scripts/setup.sh makes it).
# The checkout goes first on PYTHONPATH: MLflow keys the environment it builds by conda.yaml alone, so one
# built for another checkout of smp is reused here, and its smp must not be the one that runs.
root=$(cd "$(dirname "$0")/.." && pwd)

has_smp() {  # $1 is a Python with smp installed: its metadata, read from / (the checkout's smp.egg-info
  # is no install), nothing imported
  [ -n "$1" ] && [ -x "$1" ] && (cd / && "$1" -c 'import importlib.metadata as m; m.distribution("smp")') >/dev/null 2>&1
}

launcher_python() {  # the Python running `mlflow run`: bash -c execs this script, so it is our parent
  [ -r "/proc/$PPID/cmdline" ] || return 0
  exe=$(tr '\0' '\n' <"/proc/$PPID/cmdline" | head -n 1)
  case ${exe##*/} in python*) ;; *) return 0 ;; esac
  case $exe in
    /*) echo "$exe" ;;
    */*) echo "$(readlink "/proc/$PPID/cwd")/$exe" ;;  # relative to the caller's directory
  esac
}

py=${SMP_PYTHON:-}
if [ -z "$py" ]; then
  on_path=$(command -v python || true)
  parent=$(launcher_python)
  venv=$root/.venv/bin/python
  for candidate in "$on_path" "$parent" "$venv"; do
    if has_smp "$candidate"; then py=$candidate; break; fi
  done
fi
if [ -z "$py" ]; then
  {
    echo "entrypoints/python.sh: no Python with smp installed to run $1${2:+ $2}"
    echo "  python on PATH: ${on_path:-none}${on_path:+ (no smp)}"
    echo "  Python running mlflow: ${parent:-not known}${parent:+ (no smp)}"
    echo "  $venv: $([ -e "$venv" ] && echo "no smp" || echo "absent")"
    echo "Set up .venv with 'bash scripts/setup.sh', or activate the environment where 'pip install -e .' ran,"
    echo "or set SMP_PYTHON=/path/to/python, or let MLflow build one: mlflow run . --env-manager uv ..."
  } >&2
  exit 127
fi
PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH
exec "$py" "$@"
