#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL cluster for the wrenn-db tests and prints
# its URL on stdout, e.g.
#   export WRENN_TEST_POSTGRES_URL="$(scripts/postgres.sh)"
# The cluster lives in $WRENN_PG_DIR (default /tmp/wrenn-postgres), listens on
# 127.0.0.1 only at a free port (and on a Unix socket in that dir), and trusts local
# connections: never expose it. `scripts/postgres.sh stop` stops it. Installs Debian's
# postgresql package when it is missing (as root). Idempotent: a running cluster is reused.
set -euo pipefail

dir=${WRENN_PG_DIR:-/tmp/wrenn-postgres}
data=$dir/data
log=$dir/postgres.log

find_bin() {
  local b
  for b in /usr/lib/postgresql/*/bin; do
    [ -x "$b/pg_ctl" ] && { echo "$b"; return 0; }
  done
  return 1
}

if ! bin=$(find_bin); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)" >&2
    exit 1
  fi
  WRENN_LOG_TAG=postgres
  # shellcheck source=lib/common.sh
  . "$(dirname "$0")/lib/common.sh"
  apt_install postgresql
  bin=$(find_bin) || { echo "no pg_ctl after installing postgresql" >&2; exit 1; }
fi

# initdb and the server refuse to run as root: use the postgres account then.
if [ "$(id -u)" -eq 0 ]; then
  as_pg() { runuser -u postgres -- "$@"; }
  owner=postgres
else
  as_pg() { "$@"; }
  owner=$(id -un)
fi

url() { echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"; }

if [ "${1:-}" = stop ]; then
  if [ -f "$data/PG_VERSION" ]; then as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >&2 || true; fi
  exit 0
fi

mkdir -p "$dir"
chown "$owner" "$dir"
chmod 700 "$dir"

if [ -f "$dir/port" ] && as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  url
  exit 0
fi

if [ ! -f "$data/PG_VERSION" ]; then
  echo "==> initdb $data" >&2
  as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  # Trust only the Unix socket and loopback; nothing else may connect.
  cat >"$data/pg_hba.conf" <<'HBA'
local all all              trust
host  all all 127.0.0.1/32 trust
HBA
fi

# A free port, chosen anew at each start (the old one may have been taken meanwhile),
# unless WRENN_PG_PORT asks for one (a restart its clients must find again).
port=${WRENN_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
echo "$port" >"$dir/port"

# fsync=off: a test cluster trades crash safety for speed; its data is disposable.
echo "==> pg_ctl start (127.0.0.1:$port)" >&2
as_pg "$bin/pg_ctl" -D "$data" -l "$log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >&2 \
  || { tail -n 30 "$log" >&2; exit 1; }
url
