#!/usr/bin/env bash
# Installs what building and testing Wrenn needs, from the package registries only.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp=.cache/pip-$(sha256sum tests/requirements.txt | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "==> pip install -r tests/requirements.txt"
  python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
  mkdir -p .cache && touch "$stamp"
fi
