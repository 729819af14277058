#!/usr/bin/env bash
# The main job: bootstraps .venv if needed, then runs the approximation-error study
# (python -m experiments.approx_error) at its CPU-sized defaults, writing
# experiments/results/approx_error/. Extra arguments are passed on.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/bootstrap.sh")"
cd "$root"
exec "$venv/bin/python" -m experiments.approx_error "$@"
