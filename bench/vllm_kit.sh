#!/usr/bin/env bash
# Here, on the CPU machine: build the vLLM 0.24.0 kit that `bench/gpu_check.sh vllm-unpack` and
# `vllm-nano` use on the GPU machine (it cannot reach PyPI, and a call carries <= 64 MiB).
#   bash bench/vllm_kit.sh        # -> .vllm-kit/vllm-kit.tar.xz.K-of-M (git-ignored), SHA256SUMS
#   VLLM_KIT_KEEP_FATBINS=1 bash bench/vllm_kit.sh   # CUDA code of all GPUs (more parts)
# Steps: download vllm 0.24.0 (CPython 3.12, manylinux x86_64, CUDA 13; it pins torch 2.11.0, the
# GPU image's) and the Python packages its offline path imports that the GPU image lacks; install
# them into one folder; strip what a dense Llama on Hopper never loads (bench/vllm_kit_strip.py);
# check what is left (bench/vllm_kit_check.py: every .py compiles, every load-time import on
# vllm.LLM's path resolves; every dependency imports with this Python 3.12); pack it as one tar.xz
# cut into parts of <= 50 MB.
# A one-part kit goes in one GPU call: carry [".whl", ".vllm-kit"], run
#   bash bench/gpu_check.sh vllm-nano throughput        (vLLM on nano, then jaxpaged on nano)
# A kit of M parts: one part per call, to the same warm machine (it stays warm 30 s after a call):
#   call k < M: carry [".whl", ".vllm-kit/vllm-kit.tar.xz.k-of-M", ".vllm-kit/SHA256SUMS"],
#               run bash bench/gpu_check.sh vllm-unpack
#   call M:     the same with the last part, run bash bench/gpu_check.sh vllm-nano throughput
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.24.0
# The packages that vLLM's load-time imports need and the GPU image lacks (bench/vllm_kit_check.py
# finds them), pinned to one consistent set; torch, transformers, triton, numpy... are the image's.
DEPS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16; the image's may be older
  pyzmq==27.3.0 msgspec==0.23.0 pybase64==1.5.1 cbor2==6.3.0 cachetools==8.0.3
  openai==2.54.0 distro==1.9.0 jiter==0.19.0 sniffio==1.3.1 openai-harmony==0.0.8
  fastapi==0.136.3 starlette==1.10.0 partial-json-parser==0.2.1.1.post7
  depyf==0.20.0 astor==0.8.1 dill==0.4.1  # torch.compile's wrapper imports depyf when called
  # vllm.v1.structured_output loads both grammar backends when vllm.LLM imports (through vLLM's
  # LazyLoader, which the static check does not follow): vLLM 0.24.0's pins
  llguidance==1.7.3 xgrammar==0.2.3 apache-tvm-ffi==0.1.9
)
PART_BYTES=50000000
work=${VLLM_KIT_WORK:-/tmp/vllm-kit-build}
out=.vllm-kit
python=.venv/bin/python
[ -x "$python" ] || { echo "run bash scripts/bootstrap.sh first (needs .venv)" >&2; exit 1; }
platforms=(--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
wheel_args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
            "${platforms[@]}")

mkdir -p "$work/wheels"
echo "== download vllm==$VLLM_VERSION and ${#DEPS[@]} dependencies into $work/wheels"
"$python" -m pip download -q "${wheel_args[@]}" -d "$work/wheels" "vllm==$VLLM_VERSION" \
  "${DEPS[@]}" 2>&1 | grep -v "WARNING: Location" || true
wheels=("$work"/wheels/*.whl)
[ "${#wheels[@]}" -eq $((${#DEPS[@]} + 1)) ] || {
  echo "expected $((${#DEPS[@]} + 1)) wheels in $work/wheels, found ${#wheels[@]}" >&2; exit 1; }
du -ch "${wheels[@]}" | tail -1

echo "== install into $work/site"
rm -rf "$work/site"
"$python" -m pip install -q --no-compile --no-cache-dir --target "$work/site" "${wheel_args[@]}" \
  "${wheels[@]}" 2>&1 | grep -v "WARNING: Location" || true
du -sh "$work/site"

echo "== strip"
"$python" bench/vllm_kit_strip.py "$work/site" ${VLLM_KIT_KEEP_FATBINS:+--keep-fatbins} \
  | grep -v "^dropped" || true
du -sh "$work/site"

echo "== check"
"$python" bench/vllm_kit_check.py "$work/site" | grep -v "missing if taken"

echo "== import the dependencies here (vllm itself needs torch and a GPU)"
# (xgrammar imports torch, which the GPU image has and this machine's venv does not)
deps=$(cd "$work/site" && ls -d */ *.py 2>/dev/null | sed 's|/$||; s|\.py$||' \
  | grep -vE '\.(dist-info|libs)$|^(vllm|xgrammar|bin|__pycache__)$' | sort -u)
PYTHONPATH="$work/site" "$python" -c 'import importlib, sys
for name in sys.argv[1:]: importlib.import_module(name)
print(len(sys.argv) - 1, "packages import")' $deps

echo "== pack"
rm -rf "$out" && mkdir -p "$out"
tar -C "$work/site" --sort=name --owner=0 --group=0 --numeric-owner -cf - . \
  | xz -9 -T2 > "$work/vllm-kit.tar.xz"
total=$(stat -c %s "$work/vllm-kit.tar.xz")
parts=$(( (total + PART_BYTES - 1) / PART_BYTES ))
split -b "$PART_BYTES" -d -a 1 --numeric-suffixes=1 "$work/vllm-kit.tar.xz" "$out/part"
for i in $(seq 1 "$parts"); do mv "$out/part$i" "$out/vllm-kit.tar.xz.$i-of-$parts"; done
(cd "$out" && sha256sum vllm-kit.tar.xz.* > SHA256SUMS)
ls -l "$out"
echo "kit: $total bytes ($(( total / 1048576 )) MiB) in $parts part(s) of <= $PART_BYTES bytes"
