# Benchmark of the hot path: pgbench TPS of `SELECT 1` and of `SELECT keypool_reserve(...)` at
# 1, 8 and 32 clients, measured in the same run on a private cluster, and their ratios, for
# members (users assigned to the pool's keys, who reserve on their own key first) and for
# guests (user ids nobody signed up: seed 000's users), each measured right after SELECT 1.
# Bars: reserve TPS >= 0.5 x SELECT 1 TPS at 32 clients (issue 2, members); the same for guests
# in the simple protocol (issue 28).
#
# Usage: bench/reserve.sh                          (BENCH_SECONDS=15 per measurement by default)
#        BENCH_MEMBERS=1000000 bench/reserve.sh    (members assigned first with keypool_backfill;
#                                                   100,000 by default; guests are another
#                                                   100,000 ids, BENCH_GUESTS)
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_EACH="${BENCH_SECONDS:-15}"
PORT="${KEYPOOL_BENCH_PORT:-54340}"
CLIENTS=(1 8 32)
MEMBERS="${BENCH_MEMBERS:-${BENCH_ASSIGNED:-100000}}"
GUESTS="${BENCH_GUESTS:-100000}"

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

say "assigning $MEMBERS members to the pool's 15 keys (keypool_backfill)"
start=$(date +%s.%N)
cluster_psql bench "$PORT" -q -d bench -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE TABLE bench_users (id text PRIMARY KEY);
INSERT INTO bench_users SELECT 'member-' || i FROM generate_series(1, $MEMBERS) i;
SET client_min_messages = warning;
SELECT keypool_backfill('bench_users', 'id', 'bench');
SQL
backfill_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
say "assigned in ${backfill_s} s"
work="$dir/pgbench"
install -d -o postgres -g postgres "$work"
echo 'SELECT 1;' > "$work/select1.sql"
# Simple protocol sends the statement text each time, so the user id is a literal, as an
# application would send it (pgbench substitutes :u inside the literal). The prepared protocol
# binds it as a parameter; the concatenation is planned once.
for who in member guest; do
    n=$MEMBERS
    [[ $who == guest ]] && n=$GUESTS
    printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'%s-:u'"'"', '"'"'bench'"'"');\n' "$n" "$who" > "$work/$who-simple.sql"
    printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'%s-'"'"' || :u, '"'"'bench'"'"');\n' "$n" "$who" > "$work/$who-prepared.sql"
done
tps() { # tps MODE SCRIPT CLIENTS
    as_postgres pgbench -n -h "$dir/sock" -p "$PORT" -U postgres -M "$1" -c "$3" -j 2 -T "$SECONDS_EACH" -f "$2" bench 2>/dev/null |
        awk '/^tps = / { printf "%d", $3 }'
}

say "warming up"
SECONDS_EACH=3 tps simple "$work/member-simple.sql" 8 >/dev/null || true
SECONDS_EACH=3 tps simple "$work/guest-simple.sql" 8 >/dev/null || true
declare -A base res
for mode in simple prepared; do
    for c in "${CLIENTS[@]}"; do
        say "$mode protocol, $c clients: SELECT 1, then keypool_reserve for members, then for guests"
        base[$mode,$c]=$(tps "$mode" "$work/select1.sql" "$c")
        res[member,$mode,$c]=$(tps "$mode" "$work/member-$mode.sql" "$c")
        res[guest,$mode,$c]=$(tps "$mode" "$work/guest-$mode.sql" "$c")
    done
done
evicted=$(cluster_psql bench "$PORT" -d bench -Atc "SELECT reservations_expired_early FROM keypool_status()")
members=$(cluster_psql bench "$PORT" -d bench -Atc "SELECT members FROM keypool_pool_stats WHERE pool = 'bench'")
granted=$(cluster_psql bench "$PORT" -d bench -Atc "SELECT sum(requests_today) FROM keypool_scopes")
ratio() { awk -v r="${res[$1,$2,$3]}" -v b="${base[$2,$3]}" 'BEGIN { printf "%.2f", (b > 0 ? r / b : 0) }'; }
out="$REPO/bench/results"
mkdir -p "$out"
report="$out/reserve-$(date -u +%Y%m%dT%H%M%SZ).md"
{
    echo "pgbench -j 2, ${SECONDS_EACH} s per run, synchronous_commit on, $(nproc) cores; 15 keys; random members out of $members assigned (backfill took $backfill_s s), random guests out of $GUESTS"
    echo
    echo "| protocol | clients | SELECT 1 TPS | reserve, members | ratio | reserve, guests | ratio |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for mode in simple prepared; do
        for c in "${CLIENTS[@]}"; do
            echo "| $mode | $c | ${base[$mode,$c]} | ${res[member,$mode,$c]} | $(ratio member "$mode" "$c") | ${res[guest,$mode,$c]} | $(ratio guest "$mode" "$c") |"
        done
    done
    echo
    echo "Reservations granted in the run: $granted (never settled; $evicted expired early when the ring wrapped)."
} | tee "$report"

failed=0
bar() { # bar WHO MODE
    local r
    r=$(ratio "$1" "$2" 32)
    if awk -v x="$r" 'BEGIN { exit !(x >= 0.5) }'; then
        say "bar met ($1s, $2 protocol): reserve at 32 clients is $r x SELECT 1 (>= 0.5)"
    else
        say "bar NOT met ($1s, $2 protocol): reserve at 32 clients is $r x SELECT 1 (< 0.5)"
        failed=1
    fi
}
bar member simple
bar member prepared
bar guest simple
exit "$failed"
