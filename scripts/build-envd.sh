#!/usr/bin/env bash
# Builds the guest agent as a static, stripped x86_64 binary:
#   target/x86_64-unknown-linux-gnu/envd/envd
# crt-static needs an explicit --target so build scripts and proc-macros stay dynamic.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --profile envd --target x86_64-unknown-linux-gnu -p wrenn-envd --bin envd "$@"
echo "target/x86_64-unknown-linux-gnu/envd/envd"
