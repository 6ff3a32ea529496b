#!/usr/bin/env bash
# Builds the guest binaries and the guest images (kernel cached by the hash of its
# inputs, root filesystems cached by recipe) under $WRENN_DATA_DIR (/var/lib/wrenn).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-guest.sh -q >/dev/null
cargo build -q -p wrenn-server
./target/debug/wrenn image build "$@"
