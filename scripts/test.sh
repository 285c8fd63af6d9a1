#!/usr/bin/env bash
# Set up .venv if needed, then run the CPU test suite (pass pytest arguments to narrow it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
