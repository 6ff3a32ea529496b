#!/usr/bin/env bash
# Runs Wrenn's whole test suite: Rust unit and integration tests, then the pytest
# suites that drive the real SDKs. Installs and builds what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh
echo "==> building envd (static)"
./scripts/build-guest.sh >/dev/null
echo "==> cargo test"
cargo test --workspace
echo "==> pytest"
python3 -m pytest tests
