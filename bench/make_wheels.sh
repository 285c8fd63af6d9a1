#!/usr/bin/env bash
# Here, before a GPU call: build the jaxpaged wheel of the last commit (not of uncommitted edits)
# into .whl/ (git-ignored), plus the server's wheels the GPU machine lacks (starlette, uvicorn).
# Carry `.whl` in the call.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git archive HEAD | tar -x -C "$src"
rm -f .whl/jaxpaged-*.whl
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "$src"
[ -n "$(ls .whl/starlette-* 2>/dev/null)" ] || bash ../shared/tools/gpu-wheels.sh >/dev/null
ls .whl
