#!/usr/bin/env bash
# Train one DLM preset with several seeds at once, one seed per GPU, evaluate each, and tabulate how
# many seeds learn retrieval (python -m experiments.dlm_seeds):
#
#   bash scripts/dlm_seeds.sh gpu_passkey_conv OUT_DIR "0 1 2 3" [train_dlm args]
#
# Seed i of the list runs on GPU i (CUDA_VISIBLE_DEVICES; GPU i / k under SEEDS_PER_GPU=k), through
# scripts/dlm_experiment.sh into OUT_DIR/seed<S>/ (its log in OUT_DIR/seed<S>/log), checkpoints in
# CKPT_ROOT/<preset>_seed<S>.
# Environment: NUM_GPUS (default: what nvidia-smi lists), SEEDS_PER_GPU (default 1: seeds i*k ..
# i*k+k-1 share GPU i, each training with 1/k of its memory and its evaluations with 1/k of
# MEM_FRACTION; the presets train for a fixed wall-clock time, so a shared GPU trains each seed for
# fewer steps when it is busy; gpu_passkey_conv_niah's training ran out of memory in a quarter of an
# 80 GB H100, so three of its seeds do not share one), SEED_TIMEOUT (seconds for all seeds, default
# 570: a seed still running then is stopped and left out of the table), CKPT_ROOT (default .ckpt), and
# dlm_experiment.sh's own variables (LENGTHS, EVAL_ARGS, PYTHON, MEM_FRACTION).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
usage="usage: dlm_seeds.sh PRESET OUT_DIR \"SEED ...\" [train_dlm args]"
preset="${1:?$usage}"
out="${2:?$usage}"
read -r -a seeds <<<"${3:?$usage}"
shift 3
gpus="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
per_gpu="${SEEDS_PER_GPU:-1}"
if ! [[ "$per_gpu" =~ ^[1-9][0-9]*$ ]]; then
  echo "dlm_seeds: SEEDS_PER_GPU must be a positive integer; got '$per_gpu'" >&2
  exit 2
fi
if [ "${#seeds[@]}" -gt $((gpus * per_gpu)) ]; then
  echo "dlm_seeds: ${#seeds[@]} seeds need $(( (${#seeds[@]} + per_gpu - 1) / per_gpu )) GPUs at" \
       "SEEDS_PER_GPU=$per_gpu; $gpus found (set NUM_GPUS or SEEDS_PER_GPU to override)" >&2
  exit 2
fi
# Memory shares of a seed's processes: the training's and each of its evaluations'.
train_fraction="$(awk -v k="$per_gpu" 'BEGIN { printf "%.3f", 0.75 / k }')"
eval_fraction="$(awk -v k="$per_gpu" -v f="${MEM_FRACTION:-0.28}" 'BEGIN { printf "%.3f", f / k }')"
pids=()
for i in "${!seeds[@]}"; do
  s="${seeds[$i]}"
  mkdir -p "$out/seed$s"
  echo "dlm_seeds: seed $s on GPU $((i / per_gpu)) (memory shares: training $train_fraction," \
       "each evaluation $eval_fraction); log: $out/seed$s/log" >&2
  # setsid: each seed's run is its own process group, so a timeout stops its evaluations too.
  CUDA_VISIBLE_DEVICES="$((i / per_gpu))" CKPT_DIR="${CKPT_ROOT:-.ckpt}/${preset}_seed$s" \
    XLA_PYTHON_CLIENT_MEM_FRACTION="$train_fraction" MEM_FRACTION="$eval_fraction" setsid \
    bash scripts/dlm_experiment.sh "$preset" "$out/seed$s" --seed "$s" "$@" >"$out/seed$s/log" 2>&1 &
  pids+=("$!")
done
deadline=$((SECONDS + ${SEED_TIMEOUT:-570}))
while [ -n "$(jobs -pr)" ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done
    break
  fi
  sleep 2
done
for p in "${pids[@]}"; do wait "$p" || true; done
done_dirs=()
for s in "${seeds[@]}"; do
  if compgen -G "$out/seed$s/dlm_eval_*.json" >/dev/null; then
    done_dirs+=("$out/seed$s")
  else
    echo "dlm_seeds: seed $s left no evaluation; see $out/seed$s/log" >&2
  fi
done
[ "${#done_dirs[@]}" -gt 0 ] || { echo "dlm_seeds: no seed finished" >&2; exit 1; }
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m experiments.dlm_seeds \
  --run-dirs "${done_dirs[@]}" --out "$out" --name "dlm_seeds_$preset"
