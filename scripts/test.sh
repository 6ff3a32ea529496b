#!/usr/bin/env bash
# Runs Wrenn's whole test suite: Rust unit and end-to-end tests (real guests),
# then the pytest suites that drive the real SDKs (from the project venv, .venv).
# Installs and builds what the tests need first (packages, venv, guest binaries,
# kernel and images — all cached).
set -euo pipefail
cd "$(dirname "$0")/.."
WRENN_LOG_TAG=test
# shellcheck source=lib/common.sh
. scripts/lib/common.sh
venv="${WRENN_VENV:-$PWD/.venv}"

./scripts/deps.sh
# Guest tests refuse work that would take the data directory below its reserve
# (1 GiB): on a machine short of disk they fail with insufficient_storage.
free_disk() { df -h --output=avail "$1" | tail -1 | tr -d ' '; }
say "free disk: $(free_disk .) for the build, $(free_disk /var/lib) for capsule data"
say "fresh-machine check (scripts/fresh-check.sh)"
./scripts/fresh-check.sh
say "the web dashboard (scripts/dashboard.sh; served by the servers the tests start)"
./scripts/dashboard.sh
say "guest binaries and images"
./scripts/images.sh
say "PostgreSQL for the wrenn-db tests"
export WRENN_TEST_POSTGRES_URL="$(./scripts/postgres.sh)"
trap './scripts/postgres.sh stop >/dev/null 2>&1 || true' EXIT
say "cargo test (free disk: $(free_disk .))"
cargo test --workspace
say "the control plane's API suite again, over the host agent's gRPC seam"
WRENN_TEST_AGENT=grpc cargo test -p wrenn-server --test api
say "the library's examples (built by cargo test; one runs)"
cargo run -q --example run_command
say "fuzzing, bounded (the committed corpora were replayed by cargo test)"
./scripts/fuzz.sh "${WRENN_FUZZ_SECS:-30}"
say "wrenn_embed (Python binding) into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ./bindings/python
say "pytest (free disk: $(free_disk /var/lib))"
"$venv/bin/python" -m pytest tests
