#!/usr/bin/env bash
# Proves that scripts/deps.sh works on a new machine rather than only on this one:
# it debootstraps a minimal Debian 12 (with its system python3, which refuses
# system-wide pip installs), enters it (chroot with /proc, /sys, /dev), runs deps.sh
# there and checks the result. Two machines:
#
#   clean    nothing of Wrenn's installed
#   newer    qemu-utils from a newer suite (bookworm-backports) installed first — the
#            conflict where installing Debian's QEMU made apt remove qemu-utils.
#            With backports still configured, deps.sh must plan QEMU from backports
#            (checked by simulation); with it gone, it must install Debian 12's QEMU
#            as one set.
#
# Each must end with every required binary present, the venv importing e2b, wrenn
# and pytest, nothing in the system Python, and no package removed.
#
# Cached under $WRENN_CACHE_DIR/fresh-check (default /var/cache/wrenn): the Debian
# tree as a tarball (with its package lists), downloaded .debs, pip's cache.
# Options: --keep (leave the trees in the cache dir for a look), --only clean|newer.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
WRENN_LOG_TAG=fresh-check
# shellcheck source=lib/common.sh
. scripts/lib/common.sh

keep=0 only=""
while (($#)); do
  case "$1" in
    --keep) keep=1; shift ;;
    --only) only="$2"; shift 2 ;;
    *) die "usage: $0 [--keep] [--only clean|newer]" ;;
  esac
done
[[ $(id -u) == 0 ]] || die "run as root (debootstrap, chroot)"
apt_install debootstrap debian-archive-keyring zstd

SUITE=bookworm
INCLUDE=python3,ca-certificates
cache="${WRENN_CACHE_DIR:-/var/cache/wrenn}/fresh-check"
mkdir -p "$cache/debs" "$cache/pip"
t_all=$SECONDS
mirror="${WRENN_DEBIAN_MIRROR:-$(debian_mirror "$SUITE")}"
key=$(printf '%s\n' 1 "$SUITE" minbase "$INCLUDE" "$mirror" | sha256sum | cut -c1-16)
tarball="$cache/debian12-$key.tar.zst"
work=$(mktemp -d "$cache/run.XXXXXX")
cleanup() { ((keep)) || safe_rm "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ ! -s "$tarball" ]]; then
  t=$SECONDS
  say "debootstrap --variant=minbase --include=$INCLUDE $SUITE from $mirror"
  debootstrap_progress "$work/debootstrap.log" --variant=minbase --include="$INCLUDE" "$SUITE" "$work/base" "$mirror" \
    || die "debootstrap failed (log above)"
  cp /etc/resolv.conf "$work/base/etc/resolv.conf"
  in_chroot "$work/base" apt-get update -q >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; die "apt-get update in the new tree failed"; }
  in_chroot "$work/base" apt-get clean
  tar --numeric-owner -C "$work/base" -cf - . | zstd -q -T0 -3 -o "$tarball.tmp" -f
  mv -f "$tarball.tmp" "$tarball"
  safe_rm "$work/base"
  say "cached the Debian 12 tree in $tarball ($(elapsed $((SECONDS - t))))"
fi

# new_machine NAME: a fresh tree from the tarball with the repo's scripts in /opt/wrenn.
new_machine() {
  local root="$work/$1"
  mkdir -p "$root"
  zstd -q -dc "$tarball" | tar --numeric-owner -C "$root" -xpf -
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  # What this host's administrator set up for reaching the registries (local CA
  # certificates, e.g. of a TLS-inspecting proxy, and pip's configuration) is part of
  # any new machine of this site.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    in_chroot "$root" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in $root"
  fi
  [[ ! -f /etc/pip.conf ]] || cp /etc/pip.conf "$root/etc/pip.conf"
  mkdir -p "$root/opt/wrenn/tests" "$root/root/.cache/pip"
  cp -r "$repo/scripts" "$root/opt/wrenn/"
  cp "$repo"/tests/requirements*.txt "$root/opt/wrenn/tests/"
  # Shared caches: downloaded packages and wheels (bind mounts, undone by safe_rm).
  mount --bind "$cache/debs" "$root/var/cache/apt/archives"
  mount --bind "$cache/pip" "$root/root/.cache/pip"
  echo "$root"
}
packages() { chroot "$1" dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | awk '$1 == "ii" {print $2}' | sort; }
deps() {
  local root="$1"; shift
  WRENN_CHROOT_FULL=1 in_chroot "$root" env "$@" /opt/wrenn/scripts/deps.sh
}

# check NAME ROOT BEFORE: what every machine must end with.
check() {
  local name="$1" root="$2" before="$3" bad=() removed tool
  removed=$(comm -23 "$before" <(packages "$root"))
  [[ -z "$removed" ]] || bad+=("packages removed: $(echo $removed)")
  ! grep -q '^Remove:' "$root/var/log/apt/history.log" 2>/dev/null || bad+=("apt history has a Remove: line")
  for tool in qemu-system-x86_64 qemu-img nft ip debootstrap chromium; do
    in_chroot "$root" sh -c "command -v $tool" >/dev/null || bad+=("$tool missing")
  done
  in_chroot "$root" qemu-img --version >/dev/null 2>&1 || bad+=("qemu-img does not run")
  in_chroot "$root" qemu-system-x86_64 --version >/dev/null 2>&1 || bad+=("qemu-system-x86_64 does not run")
  in_chroot "$root" /opt/wrenn/.venv/bin/python -c 'import e2b, wrenn, pytest, playwright.sync_api' || bad+=("venv cannot import e2b, wrenn, pytest, playwright")
  if in_chroot "$root" /usr/bin/python3 -c 'import e2b' 2>/dev/null; then bad+=("e2b was installed into the system Python"); fi
  [[ -z "$(ls -A "$root"/usr/local/lib/python3*/dist-packages 2>/dev/null)" ]] || bad+=("files in the system Python's dist-packages")
  if ((${#bad[@]})); then
    say "FAIL $name: ${bad[*]}"
    return 1
  fi
  say "ok   $name: QEMU $(pkg_in "$root" qemu-system-x86), qemu-utils $(pkg_in "$root" qemu-utils), no package removed, chromium present, venv imports e2b, wrenn, pytest, playwright"
}
pkg_in() { chroot "$1" dpkg-query -W -f='${Version}' "$2" 2>/dev/null || echo none; }

failed=0
results=()

# ---- clean machine -------------------------------------------------------------------
if [[ -z "$only" || "$only" == clean ]]; then
  t=$SECONDS
  say "machine 'clean': Debian 12 with its system python3; running deps.sh"
  root=$(new_machine clean)
  packages "$root" >"$work/clean.before"
  rc=0
  deps "$root" >"$work/clean.log" 2>&1 || { rc=$?; tail -n 30 "$work/clean.log" >&2; say "FAIL clean: deps.sh exited $rc"; }
  # Checked whatever deps.sh answered: what it left behind is the finding.
  if check clean "$root" "$work/clean.before" && ((rc == 0)); then
    results+=("clean: ok in $(elapsed $((SECONDS - t)))")
  else
    failed=1 results+=("clean: FAILED")
  fi
  ((keep)) || safe_rm "$root"
fi

# ---- newer qemu-utils preinstalled ---------------------------------------------------------
if [[ -z "$only" || "$only" == newer ]]; then
  t=$SECONDS
  root=$(new_machine newer)
  bp="$root/etc/apt/sources.list.d/backports.list"
  echo "deb $mirror $SUITE-backports main" >"$bp"
  in_chroot "$root" apt-get update -q >"$work/newer.log" 2>&1
  in_chroot "$root" apt-get install -y -q --no-install-recommends -t "$SUITE-backports" qemu-utils >>"$work/newer.log" 2>&1 \
    || { tail -n 20 "$work/newer.log" >&2; die "could not install qemu-utils from $SUITE-backports"; }
  newer_v=$(pkg_in "$root" qemu-utils)
  say "machine 'newer': qemu-utils $newer_v from $SUITE-backports installed first"
  packages "$root" >"$work/newer.before"
  ok=1
  # a) the newer suite still configured: QEMU must be planned from it, nothing removed.
  if plan=$(deps "$root" WRENN_APT_SIMULATE=1 2>&1); then
    if grep -qF "Inst qemu-system-x86 ($newer_v " <<<"$plan"; then
      say "ok   newer (backports configured): deps.sh plans qemu-system-x86 $newer_v from $SUITE-backports"
    else
      printf '%s\n' "$plan" | tail -n 20 >&2
      say "FAIL newer (backports configured): qemu-system-x86 $newer_v not in the plan"
      ok=0
    fi
  else
    printf '%s\n' "$plan" | tail -n 20 >&2
    say "FAIL newer (backports configured): deps.sh simulation failed"
    ok=0
  fi
  # b) the suite gone (as on a machine whose image was built with it): one Debian 12 set.
  rm -f "$bp"
  in_chroot "$root" apt-get update -q >>"$work/newer.log" 2>&1
  rc=0
  deps "$root" >>"$work/newer.log" 2>&1 || { rc=$?; tail -n 30 "$work/newer.log" >&2; say "FAIL newer: deps.sh exited $rc"; ok=0; }
  check "newer (backports gone)" "$root" "$work/newer.before" || ok=0
  [[ "$(pkg_in "$root" qemu-utils)" == "$(pkg_in "$root" qemu-system-x86)" ]] \
    || { say "FAIL newer: qemu-utils and qemu-system-x86 of different versions"; ok=0; }
  if ((ok)); then results+=("newer: ok in $(elapsed $((SECONDS - t)))"); else failed=1 results+=("newer: FAILED"); fi
  ((keep)) || safe_rm "$root"
fi

say "fresh-machine check: ${results[*]} (total $(elapsed $((SECONDS - t_all))))"
((keep)) && say "trees kept in $work"
exit $failed
