#!/usr/bin/env bash
# The test suite: bootstraps .venv and the offline data if needed, then runs pytest on CPU.
# Extra arguments are passed to pytest (e.g. -k kernel, -m "not slow").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/bootstrap.sh")"
bash "$root/scripts/setup_data.sh"
cd "$root"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
