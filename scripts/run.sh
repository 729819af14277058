#!/usr/bin/env bash
# The main job: bootstraps .venv if needed, then runs the approximation-error study
# (experiments/approx_error.py) at its CPU-sized defaults. Extra arguments are passed on.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
exec "$venv/bin/python" experiments/approx_error.py "$@"
