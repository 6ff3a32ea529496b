#!/usr/bin/env bash
# Installs what building, running and testing Wrenn needs, from the package
# registries only (Debian/Ubuntu packages, PyPI), as root. Idempotent: seconds when
# everything is there.
#
#   1. QEMU as one consistent set (qemu-system-x86 and qemu-utils of one release,
#      in one apt-get install; see qemu_set in scripts/lib/common.sh)
#   2. the other host packages (nftables, iproute2, debootstrap, ...)
#   3. a Python virtual environment ($WRENN_VENV, default <repo>/.venv) with the test
#      suite's tools and both SDKs; nothing is installed into the system Python
#   4. a check that every tool Wrenn needs is on PATH, naming the package of any missing
#
# apt never removes a package here: each install is simulated first and refused, with
# the packages named, if apt would remove any; the real run carries --no-remove.
#
# Environment: WRENN_VENV (venv dir), WRENN_PYTHON (interpreter that creates the venv,
# default python3), WRENN_APT_SIMULATE=1 (print what apt would do, install nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
WRENN_LOG_TAG=deps
# shellcheck source=lib/common.sh
. scripts/lib/common.sh

[[ $(id -u) == 0 ]] || die "run as root: it installs packages with apt-get"
command -v apt-get >/dev/null || die "apt-get not found: Wrenn's scripts support Debian and Ubuntu hosts"
t0=$SECONDS
venv="${WRENN_VENV:-$PWD/.venv}"
py="${WRENN_PYTHON:-python3}"

# ---- 1. QEMU ------------------------------------------------------------------------
read -r -a qemu_args <<<"$(qemu_set)"
if ((${#qemu_args[@]})); then apt_install "${qemu_args[@]}"; fi

# ---- 2. other host packages ----------------------------------------------------------
# nftables, iproute2: capsule networking. debootstrap, debian-archive-keyring, zstd,
# e2fsprogs: root filesystem builds. libclang-dev: bindgen for userfaultfd-sys.
# xfsprogs: the disk tests (reflink on XFS). docker-registry: the OCI registry the image
# tests start. chromium: the dashboard's browser tests (driven by Playwright from the
# venv, with Debian's browser). python3 + python3-venv: the test venv. Node.js and npm
# (for the dashboard's build) are the machine's own: see scripts/dashboard.sh.
host_pkgs=(nftables iproute2 curl ca-certificates debootstrap debian-archive-keyring zstd
  e2fsprogs xfsprogs libclang-dev docker-registry chromium)
command -v "$py" >/dev/null || { [[ -n "${WRENN_PYTHON:-}" ]] && die "WRENN_PYTHON=$py not found"; host_pkgs+=(python3); }
apt_install "${host_pkgs[@]}"

if [[ "${WRENN_APT_SIMULATE:-0}" == 1 ]]; then
  say "simulation only (WRENN_APT_SIMULATE=1): nothing was installed"
  exit 0
fi

# ---- 3. Python virtual environment ---------------------------------------------------
venv_ok() { "$venv/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; }
if ! venv_ok; then
  say "creating the Python virtual environment $venv ($("$py" --version 2>&1))"
  rm -rf "$venv"
  if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
    # Debian and Ubuntu ship venv's pip bootstrap separately (python3-venv, or
    # python3.X-venv for a non-default python3.X).
    rm -rf "$venv"
    pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install python3-venv
    "$py" -m venv "$venv" >/dev/null 2>&1 || { rm -rf "$venv"; apt_install "python$pyver-venv"; "$py" -m venv "$venv"; } \
      || die "$py -m venv $venv failed"
  fi
fi
req_hash=$(cat tests/requirements.txt tests/requirements-wrenn-sdk.txt | sha256sum | cut -c1-16)
stamp="$venv/.wrenn-requirements-$req_hash"
if [[ ! -e "$stamp" ]]; then
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  say "pip install -r tests/requirements.txt -r tests/requirements-wrenn-sdk.txt (into $venv)"
  "${pip[@]}" install -r tests/requirements.txt
  # The wrenn SDK declares Python >= 3.13 but is pure Python and runs on 3.10+.
  "${pip[@]}" install --ignore-requires-python -r tests/requirements-wrenn-sdk.txt
  rm -f "$venv"/.wrenn-requirements-*
  touch "$stamp"
fi

# ---- 4. check ------------------------------------------------------------------------
missing=()
need_tool() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (package $2)"); }
need_tool qemu-system-x86_64 qemu-system-x86
need_tool qemu-img qemu-utils
need_tool nft nftables
need_tool ip iproute2
need_tool debootstrap debootstrap
need_tool mkfs.ext4 e2fsprogs
need_tool zstd zstd
need_tool chromium chromium
((${#missing[@]} == 0)) || die "missing after install: ${missing[*]}"

qemu_v=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p')
img_v=$(qemu-img --version | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p')
[[ -n "$qemu_v" && -n "$img_v" ]] || die "qemu-system-x86_64 or qemu-img does not run"
printf '%s\n7.2\n' "$qemu_v" | sort -V -C -r || die "QEMU $qemu_v is older than 7.2 (microvm with virtio-mmio migration)"
"$venv/bin/python" -c 'import e2b, wrenn, pytest, playwright.sync_api' 2>/dev/null \
  || die "the venv $venv cannot import e2b, wrenn, pytest and playwright"

say "ready in $(elapsed $((SECONDS - t0))): QEMU $qemu_v (qemu-img $img_v), nft, ip, debootstrap, $(chromium --version 2>/dev/null | head -1);" \
  "Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())') venv $venv"
