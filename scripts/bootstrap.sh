#!/usr/bin/env bash
# Finds a Python >= 3.12, creates .venv beside the repository root and installs
# the project with its test extras. Re-running is cheap: the install is skipped
# while pyproject.toml is unchanged. Source it or run it; prints the venv path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

find_python() {
  local cand
  for cand in "${BAATT_PYTHON:-}" python3.12 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  # pyenv keeps 3.12 behind a shim that needs PYENV_VERSION; prefer the oldest
  # eligible version (3.12 is what the GPU machines run).
  if command -v pyenv >/dev/null 2>&1; then
    local v
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -V); do
      local p; p="$(PYENV_VERSION="$v" pyenv which python3 2>/dev/null || true)"
      if [ -n "$p" ] && "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
        echo "$p"; return 0
      fi
    done
  fi
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python)" || { echo "bootstrap: no Python >= 3.12 found (set BAATT_PYTHON or install 3.12)" >&2; exit 1; }
  echo "bootstrap: creating $venv with $py" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.baatt-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing baatt and its dependencies into $venv (log: $venv/install.log)" >&2
  # pip's chatter goes to a log; it is shown only when the install fails.
  if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
         "$venv/bin/python" -m pip install -q -e "$root[test]"; } >"$venv/install.log" 2>&1; then
    cat "$venv/install.log" >&2
    echo "bootstrap: installing into $venv failed (log above)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
echo "$venv"
