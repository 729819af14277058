#!/usr/bin/env bash
# Train one DLM preset with several seeds at once, one seed per GPU, evaluate each, and tabulate how
# many seeds learn retrieval (python -m experiments.dlm_seeds):
#
#   bash scripts/dlm_seeds.sh gpu_passkey_conv OUT_DIR "0 1 2 3" [train_dlm args]
#
# Seed i of the list runs on GPU i (CUDA_VISIBLE_DEVICES), through scripts/dlm_experiment.sh into
# OUT_DIR/seed<S>/ (its log in OUT_DIR/seed<S>/log), checkpoints in CKPT_ROOT/<preset>_seed<S>.
# Environment: NUM_GPUS (default: what nvidia-smi lists), SEED_TIMEOUT (seconds for all seeds, default
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
if [ "${#seeds[@]}" -gt "$gpus" ]; then
  echo "dlm_seeds: ${#seeds[@]} seeds need as many GPUs; $gpus found (set NUM_GPUS to override)" >&2
  exit 2
fi
pids=()
for i in "${!seeds[@]}"; do
  s="${seeds[$i]}"
  mkdir -p "$out/seed$s"
  # setsid: each seed's run is its own process group, so a timeout stops its evaluations too.
  CUDA_VISIBLE_DEVICES="$i" CKPT_DIR="${CKPT_ROOT:-.ckpt}/${preset}_seed$s" setsid \
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
