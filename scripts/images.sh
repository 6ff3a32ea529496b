#!/usr/bin/env bash
# Builds the guest binaries and the guest images (kernel cached by the hash of its
# inputs, root filesystems cached by recipe) under $WRENN_DATA_DIR (/var/lib/wrenn).
set -euo pipefail
cd "$(dirname "$0")/.."
WRENN_LOG_TAG=images
# shellcheck source=lib/common.sh
. scripts/lib/common.sh
command -v cargo >/dev/null || die "cargo not found: install Rust >= 1.87 with rustup"
say "guest binaries (envd, wrenn-init; static)"
./scripts/build-guest.sh -q >/dev/null
say "wrenn (debug build)"
cargo build -q -p wrenn-server
./target/debug/wrenn image build "$@"
