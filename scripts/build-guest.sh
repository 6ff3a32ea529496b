#!/usr/bin/env bash
# Builds the guest binaries as static, stripped x86_64 executables:
#   target/x86_64-unknown-linux-gnu/guest/envd        the in-capsule agent
#   target/x86_64-unknown-linux-gnu/guest/wrenn-init  the capsule's PID 1
# crt-static needs an explicit --target so build scripts and proc-macros stay dynamic.
# Prints the envd path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
# The checkout's path is remapped so that the binaries (whose hashes key the images
# built from them) are the same from any clone.
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$PWD=/wrenn" \
  cargo build --profile guest --target x86_64-unknown-linux-gnu -p wrenn-envd -p wrenn-init --bin envd --bin wrenn-init "$@"
echo "target/x86_64-unknown-linux-gnu/guest/envd"
