#!/usr/bin/env bash
# Installs what building, running and testing Wrenn needs, from the package
# registries only (Debian, PyPI). Idempotent and quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Runtime: QEMU, qcow2 tools, nftables, iproute2. Image builds install their own
# build dependencies (images/build-*.sh).
# libclang-dev: bindgen for userfaultfd-sys; xfsprogs + e2fsprogs: the disk tests (reflink on XFS, real ext4).
apt_pkgs=(qemu-system-x86 qemu-utils nftables iproute2 curl python3-pip libclang-dev xfsprogs e2fsprogs)
need_apt=()
for pkg in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp=.cache/pip-$(cat tests/requirements.txt tests/requirements-wrenn-sdk.txt | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "==> pip install -r tests/requirements.txt -r tests/requirements-wrenn-sdk.txt"
  python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
  python3 -m pip install -q --disable-pip-version-check --ignore-requires-python \
    -r tests/requirements-wrenn-sdk.txt
  mkdir -p .cache && touch "$stamp"
fi
