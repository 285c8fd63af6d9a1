#!/usr/bin/env bash
# Here, before a GPU call: build the jaxpaged wheel into .whl/ (git-ignored) for the GPU machine,
# plus the server's wheels it lacks (starlette, uvicorn). Carry `.whl` in the call.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f .whl/jaxpaged-*.whl
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
[ -n "$(ls .whl/starlette-* 2>/dev/null)" ] || bash ../shared/tools/gpu-wheels.sh >/dev/null
ls .whl
