#!/usr/bin/env bash
# Set up, then run the test suite (extra arguments go to pytest, e.g. `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
SMP_EXTRAS=${SMP_EXTRAS:-test,spark} bash scripts/setup.sh  # pyspark: the Spark engine's tests (tests/test_spark.py)
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest -rs "$@"  # -rs: each skipped test's reason (no PostgreSQL, no Java 17) in the summary
