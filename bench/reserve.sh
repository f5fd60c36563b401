#!/usr/bin/env bash
# Benchmark of the hot path: pgbench TPS of `SELECT 1` and of `SELECT keypool_reserve(...)` at
# 1, 8 and 32 clients, measured in the same run on a private cluster, and their ratios.
# Bar (issue 2): reserve TPS >= 0.5 x SELECT 1 TPS at 32 clients.
#
# Usage: bench/reserve.sh                      (BENCH_SECONDS=15 per measurement by default)
#        BENCH_ASSIGNED=1000000 bench/reserve.sh   (first assigns that many users to the pool's keys
#                                                   with keypool_backfill; reservations then draw
#                                                   from those users)
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_EACH="${BENCH_SECONDS:-15}"
PORT="${KEYPOOL_BENCH_PORT:-54340}"
CLIENTS=(1 8 32)
ASSIGNED="${BENCH_ASSIGNED:-0}"
USERS="${BENCH_USERS:-$((ASSIGNED > 0 ? ASSIGNED : 100000))}"

ensure_setup
install_extension release
# Default pg_keypool settings: the member cache holds the users who reserve (bench/members.sh
# measures a set larger than the cache).
cluster_start bench "$PORT" "max_connections = 200"
trap 'cluster_stop bench' EXIT
dir="$(cluster_dir bench)"

say "setting up database bench: pool 'bench' with 15 keys, limits far above what the run can use"
cluster_psql bench "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" -c "CREATE DATABASE bench"
cluster_psql bench "$PORT" -q -d bench -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('bench');
SELECT keypool_add_key('bench', 'openai', 'sk-bench-key-' || i || '-000000000', 'gpt-4o-mini',
                       rpm => 2000000000, rpd => 2000000000, tpm => 1000000000000, tpd => 1000000000000)
  FROM generate_series(1, 15) i;
SQL

if ((ASSIGNED > 0)); then
    say "assigning $ASSIGNED users to the pool's 15 keys (keypool_backfill)"
    start=$(date +%s.%N)
    cluster_psql bench "$PORT" -q -d bench -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE TABLE bench_users (id text PRIMARY KEY);
INSERT INTO bench_users SELECT 'user-' || i FROM generate_series(1, $ASSIGNED) i;
SET client_min_messages = warning;
SELECT keypool_backfill('bench_users', 'id', 'bench');
SQL
    backfill_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    say "assigned in ${backfill_s} s"
fi

work="$dir/pgbench"
install -d -o postgres -g postgres "$work"
echo 'SELECT 1;' > "$work/select1.sql"
# Simple protocol sends the statement text each time, so the user id is a literal, as an
# application would send it (pgbench substitutes :u inside the literal). The prepared protocol
# binds it as a parameter; the concatenation is planned once.
printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'user-:u'"'"', '"'"'bench'"'"');\n' "$USERS" > "$work/reserve-simple.sql"
printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'user-'"'"' || :u, '"'"'bench'"'"');\n' "$USERS" > "$work/reserve-prepared.sql"
chown postgres:postgres "$work"/*.sql

tps() { # tps MODE SCRIPT CLIENTS
    as_postgres pgbench -n -h "$dir/sock" -p "$PORT" -U postgres -M "$1" -c "$3" -j 2 -T "$SECONDS_EACH" -f "$2" bench 2>/dev/null |
        awk '/^tps = / { printf "%d", $3 }'
}

say "warming up"
SECONDS_EACH=3 tps simple "$work/reserve-simple.sql" 8 >/dev/null || true

declare -A base res
for mode in simple prepared; do
    for c in "${CLIENTS[@]}"; do
        say "$mode protocol, $c clients: SELECT 1, then keypool_reserve"
        base[$mode,$c]=$(tps "$mode" "$work/select1.sql" "$c")
        res[$mode,$c]=$(tps "$mode" "$work/reserve-$mode.sql" "$c")
    done
done

evicted=$(cluster_psql bench "$PORT" -d bench -Atc "SELECT reservations_expired_early FROM keypool_status()")
members=$(cluster_psql bench "$PORT" -d bench -Atc "SELECT members FROM keypool_pool_stats WHERE pool = 'bench'")
granted=$(cluster_psql bench "$PORT" -d bench -Atc "SELECT sum(requests_today) FROM keypool_scopes")

ratio() { awk -v r="${res[$1,$2]}" -v b="${base[$1,$2]}" 'BEGIN { printf "%.2f", (b > 0 ? r / b : 0) }'; }
out="$REPO/bench/results"
mkdir -p "$out"
report="$out/reserve-$(date -u +%Y%m%dT%H%M%SZ).md"
{
    echo "pgbench -j 2, ${SECONDS_EACH} s per run, synchronous_commit on, $(nproc) cores; random users out of $USERS; 15 keys; $members users assigned${backfill_s:+ (backfill took $backfill_s s)}"
    echo
    echo "| protocol | clients | SELECT 1 TPS | keypool_reserve TPS | ratio |"
    echo "|---|---:|---:|---:|---:|"
    for mode in simple prepared; do
        for c in "${CLIENTS[@]}"; do
            echo "| $mode | $c | ${base[$mode,$c]} | ${res[$mode,$c]} | $(ratio "$mode" "$c") |"
        done
    done
    echo
    echo "Reservations granted in the run: $granted (never settled; $evicted expired early when the ring wrapped)."
} | tee "$report"

failed=0
for mode in simple prepared; do
    r=$(ratio "$mode" 32)
    if awk -v x="$r" 'BEGIN { exit !(x >= 0.5) }'; then
        say "bar met ($mode protocol): reserve at 32 clients is $r x SELECT 1 (>= 0.5)"
    else
        say "bar NOT met ($mode protocol): reserve at 32 clients is $r x SELECT 1 (< 0.5)"
        failed=1
    fi
done
exit "$failed"
