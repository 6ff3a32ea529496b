#!/usr/bin/env bash
# First command on a fresh Debian/Ubuntu host (as root): installs what Wrenn needs
# from the package registries, builds the guest images and the `wrenn` binary,
# checks the host, and runs a command in a capsule.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh
echo "==> guest binaries and images (the kernel build takes ~8 min once)"
./scripts/images.sh
echo "==> wrenn (release build)"
cargo build -q --release -p wrenn-server
install -m 0755 target/release/wrenn /usr/local/bin/wrenn
wrenn doctor || true
echo "==> wrenn run --template minimal -- sh -c 'echo hello from \$(uname -n); exit 7'"
set +e
wrenn run --template minimal -- sh -c 'echo hello from $(uname -n); exit 7'
echo "(exit code $?)"
