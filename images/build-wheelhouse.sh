#!/usr/bin/env bash
# Fetches the wheels a recipe template installs in its guest (which has no package
# index to reach while it builds):
#   images/build-wheelhouse.sh <recipe dir>
# -> $WRENN_DATA_DIR/images/cache/wheels-<hash>/   (the last line of stdout)
#
# The wheels are for the guest's Python (Debian bookworm: CPython 3.11, glibc 2.36,
# x86_64), whatever the host runs; the pip wheel is among them, so the guest installs
# with `python3 wheels/pip-*.whl/pip install --no-index --find-links wheels ...`. The
# directory is keyed by a hash of <recipe dir>/requirements.txt and this script, and
# written atomically: a second run with the same requirements is instant.
#
# Environment:
#   WRENN_DATA_DIR   data dir (default /var/lib/wrenn)
#   WRENN_PIP        pip to fetch with (default <repo>/.venv/bin/pip, else python3 -m pip)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
WRENN_LOG_TAG=wheelhouse
# shellcheck source=../scripts/lib/common.sh
. "$repo/scripts/lib/common.sh"

recipe_dir="${1:?usage: $0 <recipe dir>}"
req="$recipe_dir/requirements.txt"
[[ -f $req ]] || die "no $req"
data_dir="${WRENN_DATA_DIR:-/var/lib/wrenn}"
cache_dir="$data_dir/images/cache"
GUEST_PYTHON=3.11
key="$(cat "$req" "$0" | sha256sum | cut -c1-16)"
out="$cache_dir/wheels-$key"
if [[ -f $out/requirements.txt ]]; then
  say "cached $out ($(find "$out" -name '*.whl' | wc -l) wheels)"
  echo "$out"
  exit 0
fi

if [[ -n ${WRENN_PIP:-} ]]; then
  pip=("$WRENN_PIP")
elif [[ -x $repo/.venv/bin/pip ]]; then
  pip=("$repo/.venv/bin/pip")
else
  pip=(python3 -m pip)
fi
mkdir -p "$cache_dir"
tmp="$(mktemp -d "$cache_dir/tmp-wheels.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
say "fetching the wheels of $req for CPython $GUEST_PYTHON (x86_64, glibc 2.36)"
# Binary wheels only, for the guest's interpreter and C library: manylinux tags up to
# glibc 2.28 (bookworm has 2.36).
"${pip[@]}" download --quiet --disable-pip-version-check --dest "$tmp" \
  --only-binary=:all: --implementation cp --python-version "$GUEST_PYTHON" \
  --abi cp311 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
  -r "$req" pip \
  || die "pip download failed (is the Python package index reachable?)"
grep -v '^\s*#' "$req" | sed '/^\s*$/d' >"$tmp/requirements.txt"
ls "$tmp"/pip-*.whl >/dev/null 2>&1 || die "no pip wheel among the downloads"
chmod -R a+rX "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
say "$(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1) -> $out"
echo "$out"
