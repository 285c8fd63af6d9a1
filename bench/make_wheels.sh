#!/usr/bin/env bash
# Here, before a GPU call: build the jaxpaged wheel of a commit (default the last one; never of
# uncommitted edits) into a folder (default .whl/, git-ignored), plus the server's wheels the GPU
# machine lacks (starlette, uvicorn) into .whl/. Carry the folders in the call.
#   bash bench/make_wheels.sh                 # HEAD -> .whl/
#   bash bench/make_wheels.sh HEAD~1 .whl-base  # the base that STAGE-base runs in gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-HEAD}
dest=${2:-.whl}
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git archive "$rev" | tar -x -C "$src"
rm -f "$dest"/jaxpaged-*.whl
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$src"
[ -n "$(ls .whl/starlette-* 2>/dev/null)" ] || bash ../shared/tools/gpu-wheels.sh >/dev/null
# structured outputs: llguidance (an abi3 wheel, no dependencies; manylinux_2_31)
[ -n "$(ls .whl/llguidance-* 2>/dev/null)" ] || python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 -d .whl "llguidance>=1.9.1,<2" 2>&1 | grep -v "WARNING: Location" || true
# GGUF reading (the converters import it; pure Python, needs numpy, pyyaml and tqdm, which are there)
[ -n "$(ls .whl/gguf-* 2>/dev/null)" ] || python3 -m pip download -q --no-deps \
  --only-binary=:all: -d .whl "gguf>=0.17,<0.20" 2>&1 | grep -v "WARNING: Location" || true
ls "$dest"
