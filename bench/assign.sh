#!/usr/bin/env bash
# Benchmark of assignment at scale: signups (keypool_assign of new users) and reservations of
# assigned users, in a pool of 31 keys and in one of 10,000 keys, measured in the same run.
# Bar (issue 3): assigning costs O(log keys): signups with 10,000 keys >= 0.5 x signups with 31.
#
# Usage: bench/assign.sh   (BENCH_SECONDS=10 per measurement by default)
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_EACH="${BENCH_SECONDS:-10}"
PORT="${KEYPOOL_BENCH_PORT:-54341}"
BIG=10000

ensure_setup
install_extension release
cluster_start bench-assign "$PORT" "max_connections = 100" "pg_keypool.max_keys = 16384" \
    "pg_keypool.max_scopes = 16384"
trap 'cluster_stop bench-assign' EXIT
dir="$(cluster_dir bench-assign)"

say "creating pools of 31 and $BIG keys"
cluster_psql bench-assign "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" -c "CREATE DATABASE bench"
start=$(date +%s.%N)
cluster_psql bench-assign "$PORT" -q -d bench -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('k31');
SELECT keypool_add_key('k31', 'xai', 'xai-small-' || i || '-0000000000', 'grok-4', rpm => 1000000) FROM generate_series(1, 31) i;
SELECT keypool_create_pool('k$BIG');
SELECT keypool_add_key('k$BIG', 'xai', 'xai-large-' || i || '-0000000000', 'grok-4', rpm => 1000000) FROM generate_series(1, $BIG) i;
SQL
keys_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

work="$dir/pgbench"
install -d -o postgres -g postgres "$work"
for pool in k31 "k$BIG"; do
    printf '\\set u random(1, 2000000000)\nSELECT keypool_assign('"'"'u-:u'"'"', '"'"'%s'"'"');\n' "$pool" > "$work/signup-$pool.sql"
    printf '\\set u random(1, 2000000000)\nSELECT keypool_reserve('"'"'u-:u'"'"', '"'"'%s'"'"');\n' "$pool" > "$work/reserve-$pool.sql"
done
chown postgres:postgres "$work"/*.sql

tps() { # tps SCRIPT CLIENTS
    as_postgres pgbench -n -h "$dir/sock" -p "$PORT" -U postgres -c "$2" -j 2 -T "$SECONDS_EACH" -f "$1" bench 2>/dev/null |
        awk '/^tps = / { printf "%d", $3 }'
}

declare -A signup reserve spread
for pool in k31 "k$BIG"; do
    say "$pool: signups, then reservations"
    signup[$pool]=$(tps "$work/signup-$pool.sql" 8)
    reserve[$pool]=$(tps "$work/reserve-$pool.sql" 8)
    spread[$pool]=$(cluster_psql bench-assign "$PORT" -d bench -Atc \
        "SELECT max(users) - min(users) || ' (' || sum(users) || ' users)' FROM keypool_keys WHERE pool = '$pool'")
done

ratio=$(awk -v a="${signup[k$BIG]}" -v b="${signup[k31]}" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
out="$REPO/bench/results"
mkdir -p "$out"
{
    echo "pgbench -c 8 -j 2, ${SECONDS_EACH} s per run, synchronous_commit on, $(nproc) cores; adding $((BIG + 31)) keys took ${keys_s} s"
    echo
    echo "| pool | signups/s (keypool_assign) | reservations/s | users per key, max - min |"
    echo "|---|---:|---:|---:|"
    for pool in k31 "k$BIG"; do
        echo "| ${pool#k} keys | ${signup[$pool]} | ${reserve[$pool]} | ${spread[$pool]} |"
    done
    echo
    echo "Signups with $BIG keys / with 31 keys: $ratio"
} | tee "$out/assign-$(date -u +%Y%m%dT%H%M%SZ).md"

if awk -v x="$ratio" 'BEGIN { exit !(x >= 0.5) }'; then
    say "bar met: signups with $BIG keys run at $ratio x those with 31 (>= 0.5)"
else
    say "bar NOT met: signups with $BIG keys run at $ratio x those with 31 (< 0.5)"
    exit 1
fi
