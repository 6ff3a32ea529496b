#!/usr/bin/env bash
# Bounded fuzzing of every target in fuzz/ (libFuzzer through cargo-fuzz, on the
# stable toolchain: no sanitizer, coverage-guided). Usage: scripts/fuzz.sh [SECONDS]
# (per target, default 30). New inputs go to a scratch corpus; the committed corpora
# (fuzz/corpus/TARGET) seed each run and are not changed. A crash fails the run and
# leaves its reproducer under fuzz/artifacts/TARGET/ (commit it with the fix: cargo
# test replays it). Installs cargo-fuzz (crates.io) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
WRENN_LOG_TAG=fuzz
# shellcheck source=lib/common.sh
. scripts/lib/common.sh
secs=${1:-30}
version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$version"; then
  say "installing cargo-fuzz $version"
  cargo install --quiet --locked "cargo-fuzz@$version"
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd fuzz
targets=$(cargo fuzz list)
say "building the fuzz targets"
cargo fuzz build -s none
for t in $targets; do
  mkdir -p "$scratch/$t"
  say "fuzzing $t for ${secs}s"
  set +e
  cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$scratch/$t.log" 2>&1
  rc=$?
  set -e
  grep -E "^(Done |stat::number_of_executed_units)" "$scratch/$t.log" >&2 || true
  if [[ $rc != 0 ]]; then
    tail -n 40 "$scratch/$t.log" >&2
    die "fuzz target $t failed (exit $rc); the reproducer is under fuzz/artifacts/$t/"
  fi
done
say "fuzzing done: no crash"
