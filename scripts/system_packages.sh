#!/usr/bin/env bash
# The Debian packages some tests drive: chromium + chromium-driver (the page's browser test) and
# prometheus (the Grafana dashboard's queries). Installs the missing ones with apt (CI runs as
# root); where apt is not usable it says so and the tests that need them skip, naming why.
set -uo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then sudo=(sudo -n); else
    echo "system_packages: not root and no sudo: ${missing[*]} not installed (their tests skip)" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system_packages: no apt-get: ${missing[*]} not installed (their tests skip)" >&2
  exit 0
fi
echo "system_packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >/dev/null \
  && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || echo "system_packages: apt-get failed: ${missing[*]} not installed (their tests skip)" >&2
exit 0
