#!/usr/bin/env bash
# Make ./.venv with a Python >= 3.12 and install jaxpaged (editable, with the dev extras) into it.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidates=(python3.12 python3.13 python3)
  local root
  if command -v pyenv >/dev/null 2>&1; then root=$(pyenv root); else root="$HOME/.pyenv"; fi
  for dir in "$root"/versions/3.12* "$root"/versions/3.13*; do
    [ -x "$dir/bin/python3" ] && candidates+=("$dir/bin/python3")
  done
  for py in "${candidates[@]}"; do
    local path
    path=$(command -v "$py" 2>/dev/null) || continue
    if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$path"; return 0
    fi
  done
  echo "jaxpaged needs Python >= 3.12 and none was found (tried: ${candidates[*]})" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  python=$(find_python)
  echo "creating .venv with $python ($("$python" --version))"
  "$python" -m venv .venv
fi
stamp=.venv/.jaxpaged-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import jaxpaged" && touch "$stamp"
fi
