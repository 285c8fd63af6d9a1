#!/usr/bin/env bash
# Set up .venv if needed (and the Debian packages the browser and Prometheus tests drive), then run
# the CPU test suite (pass pytest arguments to narrow it). Two pytest-xdist workers, each taking
# whole test files (a module's server or engine is built once, on one worker); the CI machine has
# two cores. `-n 0` after it runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/system_packages.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
