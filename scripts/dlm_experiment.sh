#!/usr/bin/env bash
# The DLM experiment in one command: train a preset, then evaluate the checkpoint at several
# lengths (one process per length, in parallel: compilation is host-bound, so they overlap; each
# takes a share of the GPU memory), then merge the per-length results into one table.
#
#   bash scripts/dlm_experiment.sh gpu_passkey_curriculum experiments/results/dlm [extra train_dlm args]
#
# (python -m experiments.train_dlm, then python -m experiments.eval_dlm.)
# Environment: PYTHON (default python3), LENGTHS (default "4096 2048 8192"), EVAL_ARGS (extra
# eval_dlm arguments, default "--implementation auto --only dense baatt@ baatt_ns@ meanpool xattention
# last_query@ pooled_query@ oracle@ max_oracle@ --task-decode oneshot --num-examples 32": the presets
# mask whole answers in training, so one-shot decoding is the one they were trained for),
# CKPT_DIR (default .ckpt/<preset>), MEM_FRACTION (GPU memory share of each eval process, default 0.28).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
preset="${1:?usage: dlm_experiment.sh PRESET OUT_DIR [train_dlm args]}"
out="${2:?usage: dlm_experiment.sh PRESET OUT_DIR [train_dlm args]}"
shift 2
py="${PYTHON:-python3}"
lengths="${LENGTHS:-4096 2048 8192}"
eval_args="${EVAL_ARGS:---implementation auto --only dense baatt@ baatt_ns@ meanpool xattention last_query@ pooled_query@ oracle@ max_oracle@ --task-decode oneshot --num-examples 32}"
ckpt="${CKPT_DIR:-.ckpt/$preset}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out" "$ckpt/eval"

"$py" -m experiments.train_dlm --preset "$preset" --ckpt-dir "$ckpt" --out "$out" "$@"

read -r -a lens <<<"$lengths"
pids=()
parts=()
for L in "${lens[@]}"; do
  # shellcheck disable=SC2086  # EVAL_ARGS is a list of arguments
  XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION:-0.28}" "$py" -m experiments.eval_dlm --ckpt-dir "$ckpt" \
    --lengths "$L" $eval_args --out "$ckpt/eval" --name "eval_$L" >"$ckpt/eval/log_$L" 2>&1 &
  pids+=("$!")
  parts+=("$ckpt/eval/eval_$L.json")
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "dlm_experiment: evaluation at L=${lens[$i]} failed; its log: $ckpt/eval/log_${lens[$i]}" >&2
    status=1
  fi
done
have=()
for p in "${parts[@]}"; do [ -f "$p" ] && have+=("$p"); done
[ "${#have[@]}" -gt 0 ] || { echo "dlm_experiment: no evaluation result to merge" >&2; exit 1; }
"$py" -m experiments.eval_dlm --merge "${have[@]}" --out "$out" --name "dlm_eval_$preset"
exit "$status"
