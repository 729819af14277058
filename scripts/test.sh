#!/usr/bin/env bash
# The test suite: bootstraps .venv and the offline data if needed, then runs pytest on CPU.
# Extra arguments are passed to pytest (e.g. -k kernel, -m "not slow", -n 0 for one process).
# Tests run in BAATT_TEST_WORKERS processes (default 2, pytest-xdist): most of a test's time is
# single-threaded tracing and compilation, so two processes use two cores where one would idle.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/bootstrap.sh")"
bash "$root/scripts/setup_data.sh"
cd "$root"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "${BAATT_TEST_WORKERS:-2}" --durations=15 "$@"
