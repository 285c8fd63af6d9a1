#!/usr/bin/env bash
# On the GPU machine (bench/gpu_check.sh's vllm-unpack and vllm-nano stages): gather the parts of
# the vLLM kit (bench/vllm_kit.sh) that calls carry in .vllm-kit/ into /tmp/vllm-kit, which lasts
# while the machine stays warm, and once all are there unpack the kit into /tmp/vllm-site.
#   bash bench/vllm_kit_install.sh gather    # keep the carried parts; say how many the kit has
#   bash bench/vllm_kit_install.sh install   # gather, then unpack once per kit into /tmp/vllm-site
# Every part is checked against .vllm-kit/SHA256SUMS (carried with each part); a different
# SHA256SUMS (a new kit) starts the gathering over. Running either again changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
complete=no
store=${VLLM_KIT_STORE:-/tmp/vllm-kit}
site=${VLLM_KIT_SITE:-/tmp/vllm-site}
carried=.vllm-kit
mkdir -p "$store"

gather() {
  if [ -f "$carried/SHA256SUMS" ] && ! cmp -s "$carried/SHA256SUMS" "$store/SHA256SUMS"; then
    [ -f "$store/SHA256SUMS" ] && echo "a new kit: dropping the parts of the old one"
    find "$store" -mindepth 1 -delete
    cp "$carried/SHA256SUMS" "$store/SHA256SUMS"
  fi
  [ -f "$store/SHA256SUMS" ] || { echo "error: no $carried/SHA256SUMS carried yet" >&2; return 1; }
  local part name expected
  for part in "$carried"/vllm-kit.tar.xz.*-of-*; do
    [ -f "$part" ] || continue
    name=$(basename "$part")
    [ -f "$store/$name" ] && continue
    expected=$(awk -v name="$name" '$2 == name {print $1}' "$store/SHA256SUMS")
    if [ -z "$expected" ] || [ "$(sha256sum < "$part" | cut -d' ' -f1)" != "$expected" ]; then
      echo "error: $part does not match SHA256SUMS (a part of another kit, or cut short)" >&2
      return 1
    fi
    cp "$part" "$store/$name"
  done
  local total have=0 missing=()
  total=$(wc -l < "$store/SHA256SUMS")
  for k in $(seq 1 "$total"); do
    if [ -f "$store/vllm-kit.tar.xz.$k-of-$total" ]; then have=$((have + 1))
    else missing+=("$k"); fi
  done
  echo "vllm kit: $have of $total parts in $store${missing:+ (missing: ${missing[*]})}"
  complete=$([ "$have" -eq "$total" ] && echo yes || echo no)
}

install() {
  gather
  if [ "$complete" != yes ]; then
    echo "error: the kit is incomplete; carry the missing parts" >&2; return 1
  fi
  local stamp total
  stamp=$(sha256sum < "$store/SHA256SUMS" | cut -c1-16)
  if [ "$(cat "$site/.kit-stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "vllm kit: already unpacked in $site"; return 0
  fi
  rm -rf "$site" && mkdir -p "$site"
  total=$(wc -l < "$store/SHA256SUMS")
  (cd "$store" && sha256sum --check --quiet SHA256SUMS)
  for k in $(seq 1 "$total"); do cat "$store/vllm-kit.tar.xz.$k-of-$total"; done \
    | python3 -c 'import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="tar")' "$site"
  echo "$stamp" > "$site/.kit-stamp"
  echo "vllm kit: unpacked into $site ($(du -sh "$site" | cut -f1))"
}

case ${1:-} in
  gather) gather ;;
  install) install ;;
  *) echo "usage: $0 gather|install" >&2; exit 2 ;;
esac
