#!/usr/bin/env bash
# Create ./.venv and install smp with its test extras (idempotent: skipped when pyproject.toml is unchanged).
# SMP_EXTRAS picks the extras (default "test"; scripts/test.sh adds "spark" for the Spark engine's tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.smp-installed
extras=${SMP_EXTRAS:-test}
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
fi
