#!/usr/bin/env bash
# Splits the SmolLM2 GGUF (98 MB) into two parts, and joins them back with its sha256 checked:
# for a machine that receives at most 64 MiB of files at a time (docs/dlm.md, "SmolLM2
# diffusion LM"). The parts go to <data dir>/carry/ (.data/ is ignored by git).
#
#   bash scripts/split_gguf.sh split [GGUF]   # GGUF -> carry/NAME.part1, NAME.part2, NAME.sha256
#   bash scripts/split_gguf.sh join  [GGUF]   # carry/NAME.part* -> GGUF, checked against NAME.sha256
#
# GGUF defaults to <data dir>/models/SmolLM2-135M-Instruct.Q4_1.gguf (where setup_data.sh puts it);
# the data dir is $BAATT_DATA_DIR or .data/ at the repository root. PART1_MIB sets the size of the
# first part (default 50 MiB: more than half, so that the second travels with the token streams).
# join does nothing when GGUF is already there with the right checksum.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${BAATT_DATA_DIR:-$root/.data}"
usage="usage: bash scripts/split_gguf.sh split|join [GGUF]"
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "$usage" >&2; exit 2; }
action="$1"
gguf="${2:-$data/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
name="$(basename "$gguf")"
carry="$data/carry"
part1_mib="${PART1_MIB:-50}"

case "$action" in
  split)
    [ -s "$gguf" ] || { echo "split_gguf: $gguf not found (bash scripts/setup_data.sh installs it)" >&2; exit 1; }
    if ! [[ "$part1_mib" =~ ^[1-9][0-9]*$ ]]; then
      echo "split_gguf: PART1_MIB must be a positive integer; got '$part1_mib'" >&2
      exit 2
    fi
    size=$(stat -c %s "$gguf")
    part1_bytes=$((part1_mib * 1024 * 1024))
    if [ "$part1_bytes" -ge "$size" ]; then
      echo "split_gguf: PART1_MIB=$part1_mib leaves nothing for part 2 of $size bytes" >&2
      exit 2
    fi
    mkdir -p "$carry"
    head -c "$part1_bytes" "$gguf" > "$carry/$name.part1"
    tail -c +"$((part1_bytes + 1))" "$gguf" > "$carry/$name.part2"
    (cd "$(dirname "$gguf")" && sha256sum "$name") > "$carry/$name.sha256"
    ls -l "$carry/$name".* >&2
    ;;
  join)
    sums="$carry/$name.sha256"
    [ -s "$sums" ] || { echo "split_gguf: $sums not found (carry it with the parts)" >&2; exit 1; }
    want=$(cut -d' ' -f1 "$sums")
    if [ -s "$gguf" ] && [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$want" ]; then
      exit 0
    fi
    for part in part1 part2; do
      [ -s "$carry/$name.$part" ] || { echo "split_gguf: $carry/$name.$part not found" >&2; exit 1; }
    done
    mkdir -p "$(dirname "$gguf")"
    cat "$carry/$name.part1" "$carry/$name.part2" > "$gguf.part"
    got=$(sha256sum "$gguf.part" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
      rm -f "$gguf.part"
      echo "split_gguf: the joined parts have sha256 $got, $sums says $want" >&2
      exit 1
    fi
    mv "$gguf.part" "$gguf"
    echo "split_gguf: joined $gguf (sha256 $want)" >&2
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
