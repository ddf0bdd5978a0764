#!/usr/bin/env bash
# Set up, then run the test suite (extra arguments go to pytest, e.g. `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
