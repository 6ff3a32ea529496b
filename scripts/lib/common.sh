# Shared helpers of Wrenn's shell scripts (sourced, never run).
#
#   say / die          timestamped messages on stderr, tagged with $WRENN_LOG_TAG
#   pkg_installed P    true when Debian package P is installed
#   pkg_version P      its installed version (empty when not installed)
#   apt_install [-t SUITE] [--allow-downgrades] PKG[=VER]...
#                      installs the missing ones in ONE apt-get install; simulates it
#                      first and refuses (naming them) when apt would remove anything;
#                      with WRENN_APT_SIMULATE=1 only prints what it would install
#   qemu_set           prints the QEMU packages to install as one consistent set
#   in_chroot ROOT CMD runs CMD inside ROOT with /proc, /sys, /dev mounted
#   safe_rm DIR        unmounts everything below DIR, then deletes it
#   elapsed S          "1 min 23 s" for a number of seconds

: "${WRENN_LOG_TAG:=wrenn}"
say() { printf '[%s %s] %s\n' "$WRENN_LOG_TAG" "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

elapsed() {
  local s=$1
  if ((s >= 60)); then printf '%d min %02d s' $((s / 60)) $((s % 60)); else printf '%d s' "$s"; fi
}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
pkg_version() { pkg_installed "$1" && dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# The apt log of this script run and the scripts it starts (everything apt prints goes
# there, not to the screen); created when apt first writes to it.
: "${WRENN_APT_LOG:=/tmp/wrenn-apt.$$.log}"
export WRENN_APT_LOG
apt_log() { echo "$WRENN_APT_LOG"; }

_apt_updated=0
apt_update_once() {
  ((_apt_updated)) && return 0
  say "apt-get update"
  apt-get update -q >>"$(apt_log)" 2>&1 || { tail -n 20 "$(apt_log)" >&2; die "apt-get update failed (log: $(apt_log))"; }
  _apt_updated=1
}

# apt_install [-t SUITE] [--allow-downgrades] PKG[=VERSION]...
# Installs, in one transaction, those of the given packages that are not installed
# (a PKG=VERSION is "installed" only at that version). Before installing, the
# transaction is simulated; if apt would remove any package it stops and names them,
# and the real run carries --no-remove, so apt can never remove anything silently.
apt_install() {
  local opts=() want=() p name ver
  while (($#)); do
    case "$1" in
      -t) opts+=(-t "$2"); shift 2 ;;
      --allow-downgrades) opts+=(--allow-downgrades); shift ;;
      *) want+=("$1"); shift ;;
    esac
  done
  local need=()
  for p in "${want[@]}"; do
    name=${p%%=*}
    if [[ "$p" == *=* ]]; then
      ver=${p#*=}
      [[ "$(pkg_version "$name")" == "$ver" ]] || need+=("$p")
    else
      pkg_installed "$name" || need+=("$p")
    fi
  done
  ((${#need[@]})) || return 0
  export DEBIAN_FRONTEND=noninteractive
  local args=(-y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${opts[@]}")
  local sim
  if ! sim=$(apt-get -s install "${args[@]}" "${need[@]}" 2>&1); then
    apt_update_once
    sim=$(apt-get -s install "${args[@]}" "${need[@]}" 2>&1) \
      || { printf '%s\n' "$sim" | tail -n 15 >&2; die "apt cannot install ${need[*]} (apt's reasons above)"; }
  fi
  local removals
  removals=$(printf '%s\n' "$sim" | awk '$1 == "Remv" {print $2 " " $3}')
  if [[ -n "$removals" ]]; then
    say "installing ${need[*]} would make apt REMOVE:"
    printf '    %s\n' "$removals" >&2
    die "refusing to remove packages; resolve the conflict above by hand (or install a consistent set), then run again"
  fi
  local n
  n=$(printf '%s\n' "$sim" | grep -c '^Inst ' || true)
  if [[ "${WRENN_APT_SIMULATE:-0}" == 1 ]]; then
    say "would apt-get install ${opts[*]:+${opts[*]} }${need[*]} ($n packages):"
    printf '%s\n' "$sim" | awk '$1 == "Inst" {print "    " $0}' >&2
    return 0
  fi
  say "apt-get install ${opts[*]:+${opts[*]} }${need[*]} ($n packages)"
  if ! apt-get install "${args[@]}" --no-remove "${need[@]}" >>"$(apt_log)" 2>&1; then
    # Stale package lists point at files the mirror no longer has: refresh once, retry.
    if ((_apt_updated)) || ! { apt_update_once && apt-get install "${args[@]}" --no-remove "${need[@]}" >>"$(apt_log)" 2>&1; }; then
      tail -n 25 "$(apt_log)" >&2
      die "apt-get install ${need[*]} failed (log: $(apt_log))"
    fi
  fi
}

# The QEMU packages to install, as one set from one suite: qemu-system-x86 and
# qemu-utils must come from the same QEMU release (newer qemu-utils Breaks an older
# qemu-system-common, and apt would then remove qemu-utils to install QEMU).
#   - nothing installed                  -> both, from the default suite
#   - qemu-utils V installed (e.g. from backports) and qemu-system-x86 V is
#     available from some configured suite -> both at V, from that suite (-t)
#   - qemu-utils V installed and no qemu-system-x86 V anywhere
#                                        -> both at the default candidate, explicitly
#                                           replacing qemu-utils V (said out loud)
# Prints the apt_install arguments on one line.
qemu_set() {
  local utils_v sys_v cand suite
  utils_v=$(pkg_version qemu-utils)
  sys_v=$(pkg_version qemu-system-x86)
  if [[ -n "$sys_v" && -n "$utils_v" ]]; then
    echo ""  # both there already; versions are checked afterwards
    return
  fi
  if [[ -z "$utils_v" && -n "$sys_v" ]]; then
    echo "qemu-utils=$sys_v"
    return
  fi
  if [[ -z "$utils_v" ]]; then
    echo "qemu-system-x86 qemu-utils"
    return
  fi
  # qemu-utils is installed, qemu-system-x86 is not.
  cand=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [[ -z "$cand" || "$cand" == "(none)" ]]; then
    apt_update_once
    cand=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}')
  fi
  [[ -n "$cand" && "$cand" != "(none)" ]] || die "no qemu-system-x86 package in this machine's apt sources"
  if [[ "$cand" == "$utils_v" ]]; then
    echo "qemu-system-x86=$utils_v"
    return
  fi
  suite=$(apt-cache madison qemu-system-x86 2>/dev/null \
    | awk -F'|' -v v="$utils_v" '{gsub(/ /, "", $2)} $2 == v {split($3, a, " "); split(a[2], s, "/"); print s[1]; exit}')
  if [[ -n "$suite" ]]; then
    say "qemu-utils $utils_v is installed: installing qemu-system-x86 $utils_v from $suite to match it"
    echo "-t $suite qemu-system-x86=$utils_v qemu-utils=$utils_v"
    return
  fi
  say "qemu-utils $utils_v is installed, but no configured apt source has qemu-system-x86 $utils_v;"
  say "installing QEMU $cand as one set (qemu-system-x86 and qemu-utils $utils_v -> $cand)"
  echo "--allow-downgrades qemu-system-x86=$cand qemu-utils=$cand"
}

# ---- chroots --------------------------------------------------------------------
# Unmounts anything below $1; fails if something stays mounted.
unmount_below() {
  local dir mnt
  dir="$(realpath -m "$1")"
  for mnt in $(awk '{print $2}' /proc/mounts | grep -E "^$dir(/|$)" | sort -r); do
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  done
  ! awk '{print $2}' /proc/mounts | grep -qE "^$dir(/|$)"
}
# Deletes a tree, but never one that still has a mount inside (a bind-mounted /dev
# would take the host's device nodes with it).
safe_rm() {
  [[ -e "$1" ]] || return 0
  if unmount_below "$1"; then rm -rf --one-file-system "$1"; else say "WARNING: mounts left below $1, not deleting it"; fi
}

# in_chroot ROOT CMD...: /proc always; /sys and /dev too with WRENN_CHROOT_FULL=1.
in_chroot() {
  local root="$1"; shift
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
  if [[ "${WRENN_CHROOT_FULL:-0}" == 1 ]]; then
    mountpoint -q "$root/sys" || { mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"; }
    mountpoint -q "$root/dev" || { mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"; }
  fi
  local rc=0
  LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root chroot "$root" "$@" || rc=$?
  unmount_below "$root/proc" || true
  if [[ "${WRENN_CHROOT_FULL:-0}" == 1 ]]; then
    unmount_below "$root/sys" || true
    unmount_below "$root/dev" || true
  fi
  return $rc
}

# ---- Debian trees -----------------------------------------------------------------
# The Debian mirror this machine's apt uses for SUITE (deb822 or one-line sources);
# Debian's own redirector when none lists it (e.g. an Ubuntu host).
debian_mirror() {
  local suite="$1" f m=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    m=$(awk -v suite="$suite" '
      function flush() { if (uris != "" && ok && !off && !done) { split(uris, u, " "); print u[1]; done=1; exit } uris=""; ok=0; off=0 }
      /^[ \t]*$/ { flush(); next }
      /^URIs:/ { uris=$0; sub(/^URIs:[ \t]*/, "", uris) }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok=1 }
      /^Enabled:[ \t]*no/ { off=1 }
      END { flush() }' "$f")
    [[ -n "$m" ]] && { echo "$m"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] || continue
    m=$(awk -v suite="$suite" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i+1) == suite) { print $i; exit } }' "$f")
    [[ -n "$m" ]] && { echo "$m"; return; }
  done
  echo "http://deb.debian.org/debian"
}

# debootstrap_progress LOG ARGS...: runs debootstrap ARGS, its whole output into LOG,
# and says what it is doing: each new stage, and every 25th package within a stage.
debootstrap_progress() {
  local log="$1"; shift
  local line stage last="" n=0 rc=0
  : >"$log"
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$log"
    [[ "$line" =~ ^I:\ ([A-Za-z]+) ]] || continue
    stage=${BASH_REMATCH[1]}
    [[ "$stage" != Validating ]] || continue  # alternates with Retrieving, one line per package
    if [[ "$stage" != "$last" ]]; then
      say "debootstrap: ${line#I: }"
      last=$stage n=0
    elif (((++n) % 25 == 0)); then
      say "debootstrap: ${line#I: } ($n ${stage,,} so far)"
    fi
  done < <(debootstrap "$@" 2>&1; echo "__rc=$?")
  rc=$(tail -n1 "$log" | sed -n 's/^__rc=//p')
  [[ "$rc" == 0 ]] || { tail -n 30 "$log" >&2; return 1; }
}
