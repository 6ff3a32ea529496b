#!/usr/bin/env bash
# Builds the Wrenn guest kernel (uncompressed `vmlinux` with the PVH ELF note, so
# QEMU boots it directly with `-kernel vmlinux`) from Debian's linux-source-6.1:
#   make tinyconfig -> merge images/kernel/wrenn.config -> olddefconfig -> KERNEL_LZ4
#
# Output: $WRENN_DATA_DIR/images/kernels/<hash>/vmlinux   (printed on stdout's last line)
#   <hash> = sha256(fragment + linux-source package version + this script)
# A cached kernel is reused; set WRENN_KERNEL_REBUILD=1 to force a rebuild,
# WRENN_KERNEL_JOBS to change -j (default nproc).
# Build output goes to <cache dir>/build.log (its tail is shown on failure).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
fragment="$here/kernel/wrenn.config"
self="$here/$(basename "$0")"
data_dir="${WRENN_DATA_DIR:-/var/lib/wrenn}"
src_pkg="linux-source-6.1"
jobs="${WRENN_KERNEL_JOBS:-$(nproc)}"

WRENN_LOG_TAG=build-kernel
# shellcheck source=../scripts/lib/common.sh
. "$here/../scripts/lib/common.sh"

apt_install "$src_pkg" flex bison libelf-dev bc make gcc libc6-dev xz-utils lz4 libssl-dev

src_version="$(dpkg-query -W -f='${Version}' "$src_pkg")"
hash="$( { cat "$fragment"; printf '\n%s %s\n' "$src_pkg" "$src_version"; cat "$self"; } | sha256sum | cut -c1-16)"
out_dir="$data_dir/images/kernels/$hash"
if [[ -s "$out_dir/vmlinux" && "${WRENN_KERNEL_REBUILD:-0}" != 1 ]]; then
  say "cached kernel $out_dir/vmlinux ($src_pkg $src_version)"
  echo "$out_dir/vmlinux"
  exit 0
fi

mkdir -p "$out_dir"
# One build per cache dir at a time; a second caller waits, then finds it cached.
exec 9>"$out_dir/.lock"
if ! flock -n 9; then
  say "another build of $hash is running; waiting for it"
  flock 9
fi
if [[ -s "$out_dir/vmlinux" && "${WRENN_KERNEL_REBUILD:-0}" != 1 ]]; then
  say "cached kernel $out_dir/vmlinux (built by the other process)"
  echo "$out_dir/vmlinux"
  exit 0
fi
log="$out_dir/build.log"
: >"$log"
work="$out_dir/src"
rm -rf "$work"
mkdir -p "$work"
t0=$SECONDS
fail() {
  say "ERROR: $1 (log: $log); last lines:"
  tail -n 40 "$log" >&2 || true
  exit 1
}

tarball="$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1)"
[[ -n "$tarball" ]] || die "no /usr/src/linux-source-6.1.tar.* after installing $src_pkg"
say "unpacking $(basename "$tarball") ($src_pkg $src_version) into $work"
tar -C "$work" --strip-components=1 -xf "$tarball" >>"$log" 2>&1 || fail "unpack failed"

cd "$work"
say "configuring: tinyconfig + $(basename "$fragment") + olddefconfig + KERNEL_LZ4"
{
  make ARCH=x86_64 tinyconfig &&
  scripts/kconfig/merge_config.sh -m .config "$fragment" &&
  make ARCH=x86_64 olddefconfig &&
  scripts/config --disable KERNEL_XZ --disable KERNEL_GZIP --enable KERNEL_LZ4 &&
  make ARCH=x86_64 olddefconfig
} >>"$log" 2>&1 || fail "configuration failed"

# Every option of the fragment (set or unset) must have survived olddefconfig.
missing=()
while IFS= read -r line; do
  if [[ "$line" =~ ^CONFIG_ ]]; then
    grep -qx -- "$line" .config || missing+=("$line")
  elif [[ "$line" =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set ]]; then
    ! grep -q "^${BASH_REMATCH[1]}=" .config || missing+=("${BASH_REMATCH[1]}=n")
  fi
done <"$fragment"
((${#missing[@]} == 0)) || { say "options dropped by olddefconfig: ${missing[*]}"; exit 1; }
cp .config "$out_dir/config"
say "config ok: $(grep -c '=y$' .config) options =y"

# Progress: build steps (CC, LD, AR, ... lines) against the count of the last build
# of this configuration (images/kernel/build-steps), as a percentage with the time
# spent; a live line on a terminal, else a line every $WRENN_PROGRESS_INTERVAL s (30).
expected_steps="$(cat "$here/kernel/build-steps" 2>/dev/null || echo 1200)"
say "building vmlinux with nice -n 19 make -j$jobs (~$expected_steps steps, ~8-10 min on 2 cores)"
nice -n 19 make ARCH=x86_64 -j"$jobs" vmlinux >>"$log" 2>&1 &
make_pid=$!
build_t0=$SECONDS
last_print=0
while kill -0 "$make_pid" 2>/dev/null; do
  sleep 1
  steps=$(grep -c '^  [A-Z]' "$log" || true)
  pct=$((steps * 100 / expected_steps)); ((pct <= 99)) || pct=99
  line="$(printf '%3d%% (%d/%d build steps), %s elapsed' "$pct" "$steps" "$expected_steps" "$(elapsed $((SECONDS - build_t0)))")"
  if [[ -t 2 ]]; then
    printf '\r[build-kernel %s]   %s ' "$(date +%H:%M:%S)" "$line" >&2
  elif ((SECONDS - last_print >= ${WRENN_PROGRESS_INTERVAL:-30})); then
    say "  $line"
    last_print=$SECONDS
  fi
done
[[ -t 2 ]] && printf '\n' >&2
wait "$make_pid" || fail "make vmlinux failed"

if command -v readelf >/dev/null && ! readelf -n vmlinux 2>/dev/null | grep -q 'Xen'; then
  fail "vmlinux has no PVH (Xen ELF) note"
fi
cp vmlinux "$out_dir/vmlinux.tmp"
strip --strip-debug "$out_dir/vmlinux.tmp" 2>/dev/null || true
mv -f "$out_dir/vmlinux.tmp" "$out_dir/vmlinux"
echo "$src_pkg $src_version" >"$out_dir/source-version"
grep -c '^  [A-Z]' "$log" >"$out_dir/build-steps" || true
cd "$out_dir"
# WRENN_KERNEL_KEEP_SRC=1 keeps the configured, built tree (~1.5 GB) for debugging.
[[ "${WRENN_KERNEL_KEEP_SRC:-0}" == 1 ]] || rm -rf "$work"
say "done in $(elapsed $((SECONDS - t0))) ($(cat "$out_dir/build-steps") build steps): $out_dir/vmlinux ($(du -h --apparent-size vmlinux | cut -f1))"
echo "$out_dir/vmlinux"
