#!/usr/bin/env bash
# First command on a fresh Debian/Ubuntu host (as root): installs what Wrenn needs
# from the package registries, builds the guest kernel and images and the `wrenn`
# binary, checks the host, and runs a command in a capsule. Prints how long each
# step took and what to try next.
set -euo pipefail
cd "$(dirname "$0")/.."
WRENN_LOG_TAG=setup
# shellcheck source=lib/common.sh
. scripts/lib/common.sh

[[ $(id -u) == 0 ]] || die "run as root: it installs packages and creates network namespaces"
command -v cargo >/dev/null || die "cargo not found: install Rust >= 1.87 with rustup (Debian's and Ubuntu's cargo packages are too old)"

names=() secs=()
step() {
  local name="$1"; shift
  local t=$SECONDS
  say "==> $name"
  "$@"
  names+=("$name") secs+=($((SECONDS - t)))
}
run_demo() {
  say "wrenn run --template minimal -- sh -c 'echo hello from \$(uname -n); exit 7'"
  local rc=0
  wrenn run --template minimal -- sh -c 'echo hello from $(uname -n); exit 7' || rc=$?
  [[ $rc == 7 ]] || die "the capsule's command should have exited 7, got $rc"
  say "(exit code $rc, as asked)"
}

step "packages and Python venv (scripts/deps.sh)" ./scripts/deps.sh
step "guest kernel, binaries and images (scripts/images.sh; the kernel takes ~8 min once)" ./scripts/images.sh
step "web dashboard (scripts/dashboard.sh; embedded in the release build)" ./scripts/dashboard.sh
step "wrenn release build" cargo build --release -p wrenn-server
step "install /usr/local/bin/wrenn" install -m 0755 target/release/wrenn /usr/local/bin/wrenn
step "wrenn doctor" wrenn doctor
step "a command in a capsule" run_demo

total=0 width=5
for n in "${names[@]}"; do ((${#n} <= width)) || width=${#n}; done
echo
echo "Wrenn is set up. Time per step:"
for i in "${!names[@]}"; do
  printf '  %-*s  %s\n' "$width" "${names[$i]}" "$(elapsed "${secs[$i]}")"
  total=$((total + secs[i]))
done
printf '  %-*s  %s\n' "$width" "total" "$(elapsed "$total")"
cat <<'NEXT'

Next:
  wrenn run --template python -- python3 -c 'print(6*7)'
  wrenn serve --listen 127.0.0.1:8080          # prints the admin team's API key once
  . .venv/bin/activate                         # the SDKs are installed there
  export WRENN_BASE_URL=http://127.0.0.1:8080 WRENN_API_KEY=wrn_...
  python -c 'from wrenn import Capsule; c = Capsule(wait=True); print(c.commands.run("uname -a").stdout); c.destroy()'
  export E2B_API_URL=http://127.0.0.1:8080 E2B_SANDBOX_URL=http://127.0.0.1:8080 E2B_API_KEY=wrn_...
  python -c 'from e2b import Sandbox; s = Sandbox.create(); print(s.commands.run("echo hi").stdout); s.kill()'
  ./scripts/test.sh                            # the whole test suite
NEXT
