#!/usr/bin/env bash
# Set up .venv if needed, then run the jaxpaged command with the given arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/jaxpaged "$@"
