#!/usr/bin/env bash
# A throwaway PostgreSQL for team mode and its tests, on 127.0.0.1 only.
#
#   scripts/pg.sh start DIR PORT   initdb DIR/data, start on 127.0.0.1:PORT, create databases smp and optuna;
#                                  prints the SQLAlchemy URL postgresql+psycopg2://smp@127.0.0.1:PORT
#                                  (append /smp for MLflow, /optuna for Optuna)
#   scripts/pg.sh stop DIR         stop it and delete DIR
#   scripts/pg.sh bindir           print the directory holding initdb/pg_ctl (exit 1 if none)
#
# The binaries come from $PG_BIN, else `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin
# (Debian/Ubuntu: `apt-get install -y postgresql`). PostgreSQL refuses to run as root: as root the server
# runs as $PG_USER (default postgres, created if missing) and DIR is handed to that user.
# Authentication is `trust` for the role smp on loopback: never use this for data you keep.
set -euo pipefail

bindir() {
  local d
  for d in "${PG_BIN:-}" "$(pg_config --bindir 2>/dev/null || true)" \
           $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  return 1
}

as_owner() {  # run a command as the user that owns the cluster
  if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

cmd=${1:-}
case "$cmd" in
  bindir)
    bindir || { echo "pg.sh: no PostgreSQL binaries (set PG_BIN or apt-get install -y postgresql)" >&2; exit 1; }
    ;;
  start)
    [ $# -eq 3 ] || { echo "usage: $0 start DIR PORT" >&2; exit 2; }
    dir=$2 port=$3
    bin=$(bindir) || { echo "pg.sh: no PostgreSQL binaries (set PG_BIN or apt-get install -y postgresql)" >&2; exit 1; }
    PG_USER=${PG_USER:-postgres}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" = 0 ]; then
      id -u "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
      chown "$PG_USER" "$dir"
      as_owner test -w "$dir" || { echo "pg.sh: $PG_USER cannot write $dir (a parent directory is private?)" >&2; exit 1; }
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U smp --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    # loopback TCP only; the unix socket lives in DIR (not /var/run/postgresql, which may not exist)
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 ${PG_OPTS:-}" start >/dev/null \
      || { cat "$dir/server.log" >&2; exit 1; }
    for db in smp optuna; do
      as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U smp "$db"
    done
    echo "postgresql+psycopg2://smp@127.0.0.1:$port"
    ;;
  stop)
    [ $# -ge 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }
    dir=$2
    PG_USER=${PG_USER:-postgres}
    if [ -f "$dir/data/postmaster.pid" ]; then
      bin=$(bindir)
      as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null || true
    fi
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start DIR PORT | stop DIR | bindir" >&2; exit 2
    ;;
esac
