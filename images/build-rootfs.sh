#!/usr/bin/env bash
# Builds a template root filesystem image:
#   images/build-rootfs.sh [minimal|python|base]     (default: minimal)
# -> $WRENN_DATA_DIR/templates/<name>/rootfs.img   (ext4, sparse, written atomically)
#
# Stages (each cached as a tarball under $WRENN_DATA_DIR/images/cache/, keyed by a
# hash of its recipe, so a rebuild only repeats what changed):
#   1. base      debootstrap --variant=minbase bookworm + the common packages
#   2. template  + the template's packages (python3 for `python`; python3, pip, git,
#                curl and the usual tools for `base`)
#   3. image     + wrenn-init, envd, user `user`, config files; slimmed; mkfs.ext4 -d
#
# Environment:
#   WRENN_DATA_DIR        data dir (default /var/lib/wrenn)
#   WRENN_ENVD_BIN        guest agent binary (default <repo>/target/x86_64-unknown-linux-gnu/guest/envd);
#                         if missing the image is built without envd (a warning is printed)
#   WRENN_INIT_BIN        PID 1 binary (default <repo>/target/x86_64-unknown-linux-gnu/guest/wrenn-init;
#                         built with cargo if missing)
#   WRENN_ROOTFS_SIZE     image size (default 1G; grown automatically if the tree needs more)
#   WRENN_DEBIAN_MIRROR   Debian mirror (default: the one in /etc/apt/sources.list*)
#   WRENN_EXTRA_PACKAGES  extra packages for the template stage (space separated)
set -euo pipefail

template="${1:-minimal}"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
data_dir="${WRENN_DATA_DIR:-/var/lib/wrenn}"
cache_dir="$data_dir/images/cache"
envd_bin="${WRENN_ENVD_BIN:-$repo/target/x86_64-unknown-linux-gnu/guest/envd}"
init_bin="${WRENN_INIT_BIN:-$repo/target/x86_64-unknown-linux-gnu/guest/wrenn-init}"
image_size="${WRENN_ROOTFS_SIZE:-1G}"

# ---- recipe (everything here feeds the cache keys) --------------------------
RECIPE_VERSION=1
SUITE=bookworm
VARIANT=minbase
ARCH=amd64
COMMON_PACKAGES="sudo ca-certificates procps iproute2 iputils-ping"
case "$template" in
  minimal) TEMPLATE_PACKAGES="" ;;
  python)  TEMPLATE_PACKAGES="python3" ;;
  # What E2B's users expect of `base`, the E2B API's default template.
  base)     TEMPLATE_PACKAGES="python3 python3-pip python3-venv git curl wget unzip xz-utils less file" ;;
  *) echo "usage: $0 [minimal|python|base]" >&2; exit 2 ;;
esac
TEMPLATE_PACKAGES="$TEMPLATE_PACKAGES ${WRENN_EXTRA_PACKAGES:-}"
# -----------------------------------------------------------------------------

t_start=$SECONDS
WRENN_LOG_TAG="build-rootfs $template"
# shellcheck source=../scripts/lib/common.sh
. "$repo/scripts/lib/common.sh"
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, file ownership)"

apt_install debootstrap debian-archive-keyring e2fsprogs zstd
mirror="${WRENN_DEBIAN_MIRROR:-$(debian_mirror "$SUITE")}"

mkdir -p "$cache_dir"
tmp_root="$(mktemp -d "$cache_dir/tmp.XXXXXX")"

cleanup() { safe_rm "$tmp_root"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

hash_of() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }
tar_create() { tar --numeric-owner --xattrs --xattrs-include='*' -C "$1" -cf - . | zstd -q -T0 -3 -o "$2.tmp.$$" -f && mv -f "$2.tmp.$$" "$2"; }
tar_extract() { mkdir -p "$2"; zstd -q -dc "$1" | tar --numeric-owner --xattrs --xattrs-include='*' -C "$2" -xpf -; }

chroot_apt_install() {
  local root="$1"; shift
  local args=(apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "$@")
  in_chroot "$root" "${args[@]}" >>"$tmp_root/apt.log" 2>&1 && return 0
  say "apt-get install failed; refreshing package lists and retrying"
  in_chroot "$root" apt-get update -q >>"$tmp_root/apt.log" 2>&1 \
    && in_chroot "$root" "${args[@]}" >>"$tmp_root/apt.log" 2>&1 \
    || { tail -n 30 "$tmp_root/apt.log" >&2; die "apt-get install $* failed"; }
}

# ---- 1. base ------------------------------------------------------------------
base_key="$(hash_of base "$RECIPE_VERSION" "$SUITE" "$VARIANT" "$ARCH" "$COMMON_PACKAGES")"
base_tar="$cache_dir/base-$SUITE-$base_key.tar.zst"
if [[ -s "$base_tar" ]]; then
  say "base: cached $base_tar"
else
  t=$SECONDS
  root="$tmp_root/base"
  say "base: debootstrap --variant=$VARIANT $SUITE from $mirror (~35 s)"
  debootstrap_progress "$tmp_root/debootstrap.log" --variant="$VARIANT" --arch="$ARCH" "$SUITE" "$root" "$mirror" \
    || die "debootstrap failed (log above)"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"; chmod 755 "$root/usr/sbin/policy-rc.d"
  say "base: installing $COMMON_PACKAGES"
  chroot_apt_install "$root" $COMMON_PACKAGES
  in_chroot "$root" apt-get clean
  say "base: caching tree ($(du -sh "$root" | cut -f1)) -> $base_tar"
  tar_create "$root" "$base_tar"
  safe_rm "$root"
  say "base: done in $((SECONDS - t)) s"
fi

# ---- 2. template packages -------------------------------------------------------
tpl_key="$(hash_of template "$base_key" "$TEMPLATE_PACKAGES")"
tpl_tar="$cache_dir/template-$template-$tpl_key.tar.zst"
if [[ -s "$tpl_tar" ]]; then
  say "template: cached $tpl_tar"
elif [[ -z "${TEMPLATE_PACKAGES// /}" ]]; then
  tpl_tar="$base_tar"
  say "template: no extra packages"
else
  t=$SECONDS
  root="$tmp_root/template"
  tar_extract "$base_tar" "$root"
  say "template: installing $TEMPLATE_PACKAGES"
  chroot_apt_install "$root" $TEMPLATE_PACKAGES
  in_chroot "$root" apt-get clean
  say "template: caching tree ($(du -sh "$root" | cut -f1)) -> $tpl_tar"
  tar_create "$root" "$tpl_tar"
  safe_rm "$root"
  say "template: done in $((SECONDS - t)) s"
fi

# ---- 3. image -------------------------------------------------------------------
t=$SECONDS
root="$tmp_root/image"
say "image: unpacking $(basename "$tpl_tar")"
tar_extract "$tpl_tar" "$root"

if [[ ! -x "$init_bin" || ! -x "$envd_bin" ]]; then
  say "image: building the guest binaries (scripts/build-guest.sh)"
  "$repo/scripts/build-guest.sh" -q >/dev/null || die "building envd and wrenn-init failed"
fi
[[ -x "$init_bin" ]] || die "no wrenn-init binary at $init_bin"
install -D -m 0755 "$init_bin" "$root/usr/local/bin/wrenn-init"
for name in poweroff reboot halt; do
  ln -sf /usr/local/bin/wrenn-init "$root/usr/local/sbin/$name"
done
[[ -x "$envd_bin" ]] || die "no envd binary at $envd_bin"
install -D -m 0755 "$envd_bin" "$root/usr/local/bin/envd"
envd_sha="$(sha256sum "$envd_bin" | cut -d' ' -f1)"
say "image: envd from $envd_bin"

say "image: user, sudo, config files"
in_chroot "$root" useradd --create-home --uid 1000 --user-group --shell /bin/bash --groups sudo user
printf 'user ALL=(ALL:ALL) NOPASSWD:ALL\n' >"$root/etc/sudoers.d/user"
chmod 0440 "$root/etc/sudoers.d/user"
echo capsule >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	capsule
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
printf 'nameserver 8.8.8.8\nnameserver 8.8.4.4\n' >"$root/etc/resolv.conf"
printf '/dev/vda\t/\text4\trw,relatime\t0\t1\n' >"$root/etc/fstab"
: >"$root/etc/machine-id"
ln -sfn ../proc/self/mounts "$root/etc/mtab"
# Later `apt-get install`s inside a capsule skip docs/man/locales too.
cat >"$root/etc/dpkg/dpkg.cfg.d/01-wrenn-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
EOF
cat >"$root/etc/wrenn-template" <<EOF
template=$template
recipe=$tpl_key
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
rm -f "$root/usr/sbin/policy-rc.d"

say "image: slimming"
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -rf "$root"/usr/share/{man,info,lintian,linda}/* \
       "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
       "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.bash_history
tree_kb="$(du -sk "$root" | cut -f1)"
say "image: tree $((tree_kb / 1024)) MiB, $(find "$root" | wc -l) files"

size_bytes="$(numfmt --from=iec "${image_size^^}")"
min_bytes=$(((tree_kb * 1024) * 3 / 2 + 128 * 1024 * 1024))
((size_bytes >= min_bytes)) || { size_bytes=$min_bytes; say "image: growing image to $((size_bytes >> 20)) MiB"; }

out_dir="$data_dir/templates/$template"
mkdir -p "$out_dir"
tmp_img="$out_dir/.rootfs.img.tmp.$$"
rm -f "$tmp_img"
truncate -s "$size_bytes" "$tmp_img"
say "image: mkfs.ext4 -d ($((size_bytes >> 20)) MiB, sparse)"
mkfs.ext4 -q -F -L wrenn-root -m 0 -E root_owner=0:0 -d "$root" "$tmp_img" >"$tmp_root/mkfs.log" 2>&1 \
  || { rm -f "$tmp_img"; cat "$tmp_root/mkfs.log" >&2; die "mkfs.ext4 failed"; }
e2fsck -fn "$tmp_img" >"$tmp_root/fsck.log" 2>&1 || { rm -f "$tmp_img"; cat "$tmp_root/fsck.log" >&2; die "e2fsck of the new image failed"; }

# A memory snapshot of the template was taken over the old image: it is invalid now.
if [[ -e "$out_dir/snapshot" ]]; then
  say "image: removing stale $out_dir/snapshot (taken over the previous image)"
  rm -rf "$out_dir/snapshot"
fi
mv -f "$tmp_img" "$out_dir/rootfs.img"
cat >"$out_dir/build.json" <<EOF
{"template":"$template","recipe":"$tpl_key","size_bytes":$size_bytes,"envd_sha256":"$envd_sha","init_sha256":"$(sha256sum "$init_bin" | cut -d' ' -f1)","built_at":"$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
say "image: done in $((SECONDS - t)) s; total $((SECONDS - t_start)) s"
say "$out_dir/rootfs.img: $(du -h --apparent-size "$out_dir/rootfs.img" | cut -f1) apparent, $(du -h "$out_dir/rootfs.img" | cut -f1) allocated"
echo "$out_dir/rootfs.img"
