#!/usr/bin/env bash
# Boots a template image with the Wrenn guest kernel under QEMU microvm (TCG) and
# checks it end to end:
#   images/boot-test.sh [minimal|python]      (default: minimal)
#
#   1. kernel reaches wrenn-init           (console line "wrenn-init[...]: starting")
#   2. guest network: 169.254.0.21 answers from the test namespace (ping)
#   3. envd /health answers 2xx            (only if the image has /usr/local/bin/envd)
#   4. graceful power-off: QMP system_powerdown (ACPI power button) -> init syncs,
#      reboot(RB_POWER_OFF) -> QEMU exits on its own
#
# The VM runs in a throwaway network namespace `wrenn-test-<pid>` with tap `tap0`
# 169.254.0.22/30 (guest 169.254.0.21, MAC 02:fc:00:00:00:05). The image is opened
# with snapshot=on: the guest's writes never reach the template image.
# Everything is removed on exit (trap). Times are wall-clock from QEMU spawn.
#
# Environment:
#   WRENN_DATA_DIR, WRENN_KERNEL (default: images/build-kernel.sh's cached vmlinux),
#   WRENN_ROOTFS (default templates/<name>/rootfs.img), WRENN_BOOT_TIMEOUT (s, default 60),
#   WRENN_TSC_KHZ (host TSC kHz; default from dmesg / cpuinfo; 0 = don't pass it),
#   WRENN_BOOT_APPEND (extra kernel parameters), WRENN_BOOT_IP_PNP=0 (no `ip=`:
#   wrenn-init configures eth0 itself), WRENN_BOOT_KEEP_LOG=1 keeps the console log.
set -euo pipefail

template="${1:-minimal}"
here="$(cd "$(dirname "$0")" && pwd)"
data_dir="${WRENN_DATA_DIR:-/var/lib/wrenn}"
timeout_s="${WRENN_BOOT_TIMEOUT:-60}"
rootfs="${WRENN_ROOTFS:-$data_dir/templates/$template/rootfs.img}"
ns="wrenn-test-$$"
guest_ip=169.254.0.21
host_ip=169.254.0.22
guest_mac=02:fc:00:00:00:05
port=49983
cmdline="console=ttyS0 root=/dev/vda rw init=/usr/local/bin/wrenn-init quiet"
# WRENN_BOOT_IP_PNP=0 leaves eth0 to wrenn-init's own (ioctl) configuration.
[[ "${WRENN_BOOT_IP_PNP:-1}" == 0 ]] || cmdline="$cmdline ip=$guest_ip::$host_ip:255.255.255.252:capsule:eth0:off"

# Under TCG the guest TSC is the host's TSC, and the kernel calibrates it against
# the emulated PIT; on a busy host that calibration fails, the TSC is marked
# unstable and the guest hangs before init (microvm has no HPET/PM timer to fall
# back on). Telling the kernel the frequency skips the calibration.
host_tsc_khz() {
  if [[ -n "${WRENN_TSC_KHZ:-}" ]]; then echo "$WRENN_TSC_KHZ"; return; fi
  local mhz k
  k="$(dmesg 2>/dev/null || true)"
  mhz="$(sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' <<<"$k" | tail -n1)"
  [[ -n "$mhz" ]] || mhz="$(sed -n 's/.*tsc: Detected \([0-9.]*\) MHz TSC.*/\1/p' <<<"$k" | tail -n1)"
  [[ -n "$mhz" ]] || mhz="$(sed -n 's/.*tsc: Detected \([0-9.]*\) MHz processor.*/\1/p' <<<"$k" | tail -n1)"
  [[ -n "$mhz" ]] || mhz="$(awk -F': *' '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo)"
  awk -v m="${mhz:-0}" 'BEGIN { if (m > 0) printf "%d\n", m * 1000 }'
}
tsc_khz="$(host_tsc_khz)"
[[ -n "$tsc_khz" ]] && cmdline="$cmdline tsc_early_khz=$tsc_khz"
cmdline="$cmdline ${WRENN_BOOT_APPEND:-}"

say() { printf '[boot-test %s] %s\n' "$template" "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }
[[ $(id -u) == 0 ]] || die "must run as root (network namespace, tap)"

for p in qemu-system-x86:qemu-system-x86_64 socat:socat curl:curl iproute2:ip iputils-ping:ping; do
  command -v "${p#*:}" >/dev/null || {
    say "installing ${p%%:*}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${p%%:*}" >/dev/null 2>&1 \
      || die "apt-get install ${p%%:*} failed"
  }
done

kernel="${WRENN_KERNEL:-$("$here/build-kernel.sh" | tail -n1)}"
[[ -s "$kernel" ]] || die "no kernel at $kernel"
[[ -s "$rootfs" ]] || die "no image at $rootfs (run images/build-rootfs.sh $template)"

work="$(mktemp -d /tmp/wrenn-boot-test.XXXXXX)"
console="$work/console.log"
qmp="$work/qmp.sock"
qemu_pid=""
cleanup() {
  local rc=$?
  if [[ -n "$qemu_pid" ]] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    sleep 0.2
    kill -9 "$qemu_pid" 2>/dev/null || true
  fi
  ip netns del "$ns" 2>/dev/null || true
  if ((rc != 0)) && [[ -f "$console" ]]; then
    say "console log (last 40 lines):"
    tail -n 40 "$console" >&2 || true
  fi
  if [[ "${WRENN_BOOT_KEEP_LOG:-0}" == 1 ]]; then say "console log kept: $console"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add dev tap0 mode tap
ip -n "$ns" addr add "$host_ip/30" dev tap0
ip -n "$ns" link set tap0 up

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

: >"$console"
t0="$(now)"
ip netns exec "$ns" qemu-system-x86_64 \
  -M microvm -accel tcg -m 512M -smp 1 \
  -nodefaults -no-user-config -display none -no-reboot \
  -serial "file:$console" \
  -qmp "unix:$qmp,server=on,wait=off" \
  -kernel "$kernel" -append "$cmdline" \
  -drive "id=d0,file=$rootfs,format=raw,if=none,snapshot=on" -device virtio-blk-device,drive=d0 \
  -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device "virtio-net-device,netdev=n0,mac=$guest_mac" \
  >"$work/qemu.out" 2>&1 &
qemu_pid=$!
say "qemu pid $qemu_pid, netns $ns, kernel $kernel"

# wait_for <description> <command...>: polls every 50 ms until the command succeeds.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    kill -0 "$qemu_pid" 2>/dev/null || { cat "$work/qemu.out" >&2; die "qemu exited while waiting for $what"; }
    ((SECONDS < deadline)) || die "timed out after ${timeout_s}s waiting for $what"
    sleep 0.05
  done
}

wait_for "wrenn-init" grep -q 'wrenn-init\[.*starting' "$console"
t_init="$(elapsed "$t0")"
say "wrenn-init started: ${t_init}s after spawn ($(grep -m1 -o 'kernel uptime [0-9.]* s' "$console"))"

wait_for "ping $guest_ip" ip netns exec "$ns" ping -c1 -W1 "$guest_ip"
t_net="$(elapsed "$t0")"
say "guest $guest_ip answers ping: ${t_net}s after spawn"

envd_result="not in image"
if grep -q 'started envd' "$console" || debugfs -R 'stat /usr/local/bin/envd' "$rootfs" 2>/dev/null | grep -q 'Type: regular'; then
  wait_for "envd /health" ip netns exec "$ns" curl -sf -m 1 -o /dev/null "http://$guest_ip:$port/health"
  t_envd="$(elapsed "$t0")"
  envd_result="healthy ${t_envd}s after spawn"
  say "envd /health 2xx: ${t_envd}s after spawn"
else
  say "no /usr/local/bin/envd in the image: health check skipped"
fi

grep -q 'mount .* on \|sethostname\|cannot ' "$console" && { say "init reported problems:"; grep 'wrenn-init\[' "$console" >&2; }

# Graceful power-off through the ACPI power button.
t_off="$(now)"
printf '{"execute":"qmp_capabilities"}\n{"execute":"system_powerdown"}\n' \
  | socat -t 1 - "UNIX-CONNECT:$qmp" >"$work/qmp.out" 2>&1 || true
deadline=$((SECONDS + 15))
while kill -0 "$qemu_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
if kill -0 "$qemu_pid" 2>/dev/null; then
  die "guest did not power off within 15 s of system_powerdown"
fi
wait "$qemu_pid" && qemu_rc=0 || qemu_rc=$?
qemu_pid=""
grep -q 'power off' "$console" || die "qemu exited ($qemu_rc) without wrenn-init's power-off line"
say "powered off ${qemu_rc:+(qemu exit $qemu_rc) }$(elapsed "$t_off")s after system_powerdown"

say "guest console (wrenn-init lines):"
grep 'wrenn-init\[' "$console" >&2 || true
say "OK: init ${t_init}s, network ${t_net}s, envd: $envd_result (TCG, microvm, wall clock from spawn)"
