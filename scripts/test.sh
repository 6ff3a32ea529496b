#!/usr/bin/env bash
# Runs Wrenn's whole test suite: Rust unit and end-to-end tests (real guests),
# then the pytest suites that drive the real SDKs. Installs and builds what the
# tests need first (packages, guest binaries, kernel and images — all cached).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh
echo "==> guest binaries and images"
./scripts/images.sh
echo "==> PostgreSQL for the wrenn-db tests"
export WRENN_TEST_POSTGRES_URL="$(./scripts/postgres.sh)"
trap './scripts/postgres.sh stop >/dev/null 2>&1 || true' EXIT
echo "==> cargo test"
cargo test --workspace
echo "==> wrenn_embed (Python binding)"
python3 -m pip install --quiet --disable-pip-version-check ./bindings/python
echo "==> pytest"
python3 -m pytest tests
