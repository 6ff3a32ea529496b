#!/usr/bin/env bash
# First command on a fresh host: installs what Wrenn needs, builds it, and runs a demo.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh
echo "==> building envd (static)"
bin=$(./scripts/build-guest.sh | tail -n1)
id user >/dev/null 2>&1 || useradd -m -s /bin/bash user

echo "==> starting envd on 127.0.0.1:49983"
"$bin" --addr 127.0.0.1 --port 49983 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -fsS -o /dev/null http://127.0.0.1:49983/health 2>/dev/null && break
  sleep 0.1
done
echo "==> e2b SDK demo (examples/envd_demo.py)"
E2B_DEBUG=true python3 examples/envd_demo.py
