#!/usr/bin/env bash
# Runs the pg_regress suite (tests/regress) against a private preloaded cluster.
# Needs the extension installed (scripts/test.sh does that). Usage: scripts/regress.sh [test ...]
# (KEYPOOL_PG=18 scripts/regress.sh: against PostgreSQL 18, scripts/test-major.sh)
. "$(dirname "$0")/lib.sh"

PORT="${KEYPOOL_REGRESS_PORT:-54331}"
PG_REGRESS="$(dirname "$("$PG_CONFIG" --pgxs)")/../test/regress/pg_regress"
dir="$(cluster_dir regress)"

# A new cluster each time: nothing an earlier run left (a database of a test broken off) counts.
cluster_stop regress
rm -rf "$dir/data"
cluster_start regress "$PORT" "pg_keypool.flush_interval = '1h'"
trap 'cluster_stop regress' EXIT

# pg_regress runs as postgres, which may not be able to read the checkout: give it a copy.
rm -rf "$dir/in" "$dir/out"
install -d -o postgres -g postgres "$dir/in" "$dir/out"
cp -r "$REPO/tests/regress/sql" "$REPO/tests/regress/expected" "$dir/in/"
chown -R postgres:postgres "$dir/in"

tests=("$@")
if ((${#tests[@]} == 0)); then
    mapfile -t tests < <(grep -v '^#' "$REPO/tests/regress/schedule" | sed '/^$/d')
fi

say "pg_regress: ${tests[*]}"
status=0
as_postgres "$PG_REGRESS" --host="$dir/sock" --port="$PORT" --dbname=keypool_regress \
    --bindir="$PG_BIN" --inputdir="$dir/in" --outputdir="$dir/out" "${tests[@]}" || status=$?
rm -rf "$REPO/tests/regress/results"
cp -r "$dir/out/results" "$REPO/tests/regress/results" 2>/dev/null || true
if ((status != 0)); then
    cat "$dir/out/regression.diffs" 2>/dev/null | head -200
    echo "pg_regress failed; results are in tests/regress/results" >&2
fi
exit "$status"
