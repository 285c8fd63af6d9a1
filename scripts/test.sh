#!/usr/bin/env bash
# Set up .venv if needed (and the Debian packages the browser and Prometheus tests drive), then run
# the CPU test suite (pass pytest arguments to narrow it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/system_packages.sh
exec .venv/bin/python -m pytest -q "$@"
