#!/usr/bin/env bash
# Builds the web dashboard (dashboard/ → dashboard/dist) with the machine's Node.js and
# npm, from the npm registry: `npm ci` from the committed package-lock.json, then
# `vite build`. `wrenn serve` serves dashboard/dist at / (a release build embeds it, so
# build the dashboard before `cargo build --release`; a debug build reads it from disk).
#
# Cached: npm ci runs again only when package-lock.json changes, the build only when a
# source file does. Without Node.js, cargo still builds the server; / then says how to
# build the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
WRENN_LOG_TAG=dashboard
# shellcheck source=lib/common.sh
. scripts/lib/common.sh
t0=$SECONDS

command -v node >/dev/null && command -v npm >/dev/null \
  || die "Node.js and npm are needed to build the dashboard (Node.js >= 20.19; e.g. from nodejs.org or your distribution)"
node_v=$(node --version | tr -d v)
printf '%s\n20.19\n' "$node_v" | sort -V -C -r || die "Node.js $node_v is older than 20.19 (Vite 8 needs 20.19 or later)"

cd dashboard
lock_hash=$(sha256sum package-lock.json | cut -c1-16)
if [[ ! -e "node_modules/.wrenn-lock-$lock_hash" ]]; then
  say "npm ci (Node.js $node_v)"
  npm ci --no-audit --no-fund --loglevel=error
  touch "node_modules/.wrenn-lock-$lock_hash"
fi
src_hash=$(find index.html vite.config.js svelte.config.js package-lock.json src public -type f -print0 \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
# The stamp lives beside node_modules, not in dist (everything in dist is served).
if [[ -e "node_modules/.wrenn-dist-$src_hash" && -e dist/index.html ]]; then
  say "up to date (dashboard/dist)"
  exit 0
fi
say "vite build → dashboard/dist"
npx --no-install vite build --logLevel warn
rm -f node_modules/.wrenn-dist-*
touch "node_modules/.wrenn-dist-$src_hash"
say "built in $(elapsed $((SECONDS - t0))): $(du -sh dist | cut -f1) in dashboard/dist"
