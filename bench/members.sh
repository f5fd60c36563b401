#!/usr/bin/env bash
# Benchmark of seed 004's scale (issue 16): 5,000,000 members over 31 xAI keys with default
# settings (shared memory is a cache of the members active recently).
#
#  1. 4,500,000 users of an application table assigned with keypool_backfill, then 500,000
#     signups through the keypool_on_signup trigger at 8 clients: failures, signups/s, members
#     per key max - min (shared memory's counts and the table's).
#  2. Reservations by random users at 32 clients, against SELECT 1 in the same run: from a
#     daily-active set of 10 % of the members (500,000), and from all 5,000,000 (the worst case):
#     the ratios, the cache's hit rate, and the cost of the first reservation of the day of a
#     member the cache does not hold.
#  3. The first reservation of the pool after a clean restart (its aggregates restored from the
#     state file) and after an immediate stop (counted from the table).
#
# Bars: 0 failures and members per key differing by at most 1; reserve / SELECT 1 >= 0.5 with the
# 10 % set. About 10 minutes on 2 cores. Usage: bench/members.sh (BENCH_SECONDS=15 per run)
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_EACH="${BENCH_SECONDS:-15}"
PORT="${KEYPOOL_BENCH_PORT:-54342}"
BACKFILLED="${BENCH_BACKFILLED:-4500000}"
SIGNUPS="${BENCH_SIGNUPS:-500000}"
MEMBERS=$((BACKFILLED + SIGNUPS))
ACTIVE=$((MEMBERS / 10))

ensure_setup
install_extension release
# Default pg_keypool settings: nothing but the preload line (and pgbench's connections).
cluster_start bench-members "$PORT"
trap 'cluster_stop bench-members' EXIT
dir="$(cluster_dir bench-members)"
q() { cluster_psql bench-members "$PORT" -d bench -At -v ON_ERROR_STOP=1 "$@"; }
seconds_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

say "database bench: pool 'xai' with 31 keys (seed 004), limits far above what the run can use"
cluster_psql bench-members "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" -c "CREATE DATABASE bench"
q -q <<'SQL' >/dev/null
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('xai');
SELECT keypool_add_key('xai', 'xai', 'xai-seed-004-key-' || i || '-00000000000', 'grok-4',
                       rpm => 100000000, rpd => 1000000000)
  FROM generate_series(1, 31) i;
CREATE TABLE app_users (id text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now());
SQL
max_members=$(q -c "SHOW pg_keypool.max_members")

say "inserting $BACKFILLED application users, then keypool_backfill"
q -q -c "INSERT INTO app_users (id) SELECT 'user-' || i FROM generate_series(1, $BACKFILLED) i" >/dev/null
start=$(date +%s.%N)
backfilled=$(q -c "SET client_min_messages = warning" -c "SELECT keypool_backfill('app_users', 'id', 'xai')" | tail -1)
backfill_s=$(seconds_since "$start")
backfill_rate=$(awk -v n="$backfilled" -v s="$backfill_s" 'BEGIN { printf "%d", n / s }')
say "backfill: $backfilled members in ${backfill_s} s ($backfill_rate/s)"

say "$SIGNUPS signups through the trigger at 8 clients"
work="$dir/pgbench"
install -d -o postgres -g postgres "$work"
q -q <<SQL >/dev/null
CREATE SEQUENCE signup_no START $((BACKFILLED + 1));
CREATE TRIGGER keypool_assign BEFORE INSERT ON app_users FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('xai', 'id');
SQL
echo "INSERT INTO app_users (id) VALUES ('user-' || nextval('signup_no'));" > "$work/signup.sql"
echo 'SELECT 1;' > "$work/select1.sql"
printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'user-:u'"'"', '"'"'xai'"'"');\n' "$ACTIVE" > "$work/reserve-active.sql"
printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'user-:u'"'"', '"'"'xai'"'"');\n' "$MEMBERS" > "$work/reserve-all.sql"
chown postgres:postgres "$work"/*.sql
pgb() { as_postgres pgbench -n -h "$dir/sock" -p "$PORT" -U postgres "$@" bench 2>&1; }
signup_out=$(pgb -c 8 -j 2 -t $((SIGNUPS / 8)) -f "$work/signup.sql")
signup_rate=$(awk '/^tps = / { printf "%d", $3 }' <<<"$signup_out")
signup_failed=$(awk '/number of failed transactions/ { print $5 } /^client [0-9]+ aborted/ { n++ } END { if (n) print n }' <<<"$signup_out" | head -1)
signup_failed="${signup_failed:-0}"

members_table=$(q -c "SELECT count(*) FROM keypool.member m JOIN keypool.pool p ON p.id = m.pool_id WHERE p.name = 'xai' AND m.key_id IS NOT NULL")
spread_table=$(q -c "SELECT max(n) - min(n) FROM (SELECT count(*) n FROM keypool.member GROUP BY key_id) s")
spread_shmem=$(q -c "SELECT max(users) - min(users) FROM keypool_keys WHERE pool = 'xai'")
users_shmem=$(q -c "SELECT sum(users) FROM keypool_keys WHERE pool = 'xai'")
failures=$((signup_failed + MEMBERS - members_table))
say "members: $members_table (failures $failures); per key max - min: table $spread_table, shared memory $spread_shmem"

tps() { # tps SCRIPT
    pgb -M simple -c 32 -j 2 -T "$SECONDS_EACH" -f "$1" | awk '/^tps = / { printf "%d", $3 }'
}
cache() { q -c "SELECT hits || ' ' || loads || ' ' || evictions || ' ' || members_uncached FROM keypool_member_memory"; }
hit_rate() { # hit_rate BEFORE AFTER
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); h = y[1] - x[1]; l = y[2] - x[2];
        printf "%.1f %%", (h + l > 0 ? 100 * h / (h + l) : 0) }'
}

say "warming the cache with the daily-active set ($ACTIVE members, one reservation each)"
half=$((ACTIVE / 2))
q -q -c "SELECT count(*) FROM generate_series(1, $half) i, keypool_reserve('user-' || i, 'xai') r" >/dev/null &
q -q -c "SELECT count(*) FROM generate_series($((half + 1)), $ACTIVE) i, keypool_reserve('user-' || i, 'xai') r" >/dev/null
wait

say "first reservation of the day of 20,000 members not cached, then 20,000 of cached members"
lo=$((ACTIVE * 2 + 1)); hi=$((lo + 19999))
one_pass() {
    q -c '\timing on' -c "SELECT count(*) FROM generate_series($lo, $hi) i, keypool_reserve('user-' || i, 'xai') r" |
        awk '/^Time: / { print $2 }'
}
miss_ms=$(one_pass)
hit_ms=$(one_pass)
miss_us=$(awk -v t="$miss_ms" 'BEGIN { printf "%.1f", t * 1000 / 20000 }')
hit_us=$(awk -v t="$hit_ms" 'BEGIN { printf "%.1f", t * 1000 / 20000 }')

say "32 clients: SELECT 1, reservations from the daily-active set, SELECT 1, reservations from all members"
base_active=$(tps "$work/select1.sql")
before=$(cache)
res_active=$(tps "$work/reserve-active.sql")
hits_active=$(hit_rate "$before" "$(cache)")
base_all=$(tps "$work/select1.sql")
before=$(cache)
res_all=$(tps "$work/reserve-all.sql")
after=$(cache)
hits_all=$(hit_rate "$before" "$after")
read -r _ _ evictions uncached <<<"$after"
ratio_active=$(awk -v r="$res_active" -v b="$base_active" 'BEGIN { printf "%.2f", (b > 0 ? r / b : 0) }')
ratio_all=$(awk -v r="$res_all" -v b="$base_all" 'BEGIN { printf "%.2f", (b > 0 ? r / b : 0) }')
cache_bytes=$(q -c "SELECT bytes FROM keypool_member_memory")
shmem_bytes=$(q -c "SELECT size FROM pg_shmem_allocations WHERE name = 'pg_keypool'")
cached_members=$(q -c "SELECT members FROM keypool_member_memory")

say "restarts: the first reservation after a clean one (aggregates restored), after an immediate stop (counted from the table)"
first_reservation_ms() {
    q -c '\timing on' -c "SELECT (keypool_reserve('user-1', 'xai')).granted" | awk '/^Time: / { print $2 }'
}
cluster_stop bench-members
cluster_start bench-members "$PORT"
clean_ms=$(first_reservation_ms)
as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
cluster_start bench-members "$PORT"
crash_ms=$(first_reservation_ms)
counted=$(q -c "SELECT members FROM keypool_pool_stats WHERE pool = 'xai'")

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
out="$REPO/bench/results"
mkdir -p "$out"
{
    echo "$MEMBERS members over 31 keys, default settings (pg_keypool.max_members = $max_members), $(nproc) cores, pgbench -j 2, ${SECONDS_EACH} s per run"
    echo
    echo "| assignment | members | rate | failures | per key max - min |"
    echo "|---|---:|---:|---:|---:|"
    echo "| keypool_backfill of an app table | $backfilled | $backfill_rate/s (${backfill_s} s) | 0 | |"
    echo "| trigger keypool_on_signup, 8 clients | $SIGNUPS | $signup_rate signups/s | $signup_failed | |"
    echo "| total | $members_table | | $failures | $spread_table (table), $spread_shmem (shared memory, $users_shmem counted) |"
    echo
    echo "| reservations at 32 clients | SELECT 1 TPS | reserve TPS | ratio | cache hit rate |"
    echo "|---|---:|---:|---:|---:|"
    echo "| random users of a daily-active set ($ACTIVE, 10 %) | $base_active | $res_active | $ratio_active | $hits_active |"
    echo "| random users of all $MEMBERS (worst case) | $base_all | $res_all | $ratio_all | $hits_all |"
    echo
    echo "- first reservation of the day of a member not cached: ${miss_us} µs per call in one statement, against ${hit_us} µs cached (20,000 each)"
    echo "- cache: $cached_members members cached after the runs, $evictions evictions, $uncached requests served without an entry"
    echo "- shared memory: member cache $(mib "$cache_bytes"), all of pg_keypool's region $(mib "$shmem_bytes")"
    echo "- the first reservation after a clean restart (aggregates restored from the state file): ${clean_ms} ms; after an immediate stop (its $counted members counted from the table): ${crash_ms} ms"
} | tee "$out/members-$(date -u +%Y%m%dT%H%M%SZ).md"

ok=1
if ((failures == 0)) && ((spread_table <= 1)) && ((spread_shmem <= 1)); then
    say "bar met: $members_table members, 0 failures, members per key differ by at most 1"
else
    say "bar NOT met: $failures failures, per key max - min $spread_table / $spread_shmem"
    ok=0
fi
if awk -v x="$ratio_active" 'BEGIN { exit !(x >= 0.5) }'; then
    say "bar met: reserve / SELECT 1 with the daily-active set = $ratio_active (>= 0.5)"
else
    say "bar NOT met: reserve / SELECT 1 with the daily-active set = $ratio_active (< 0.5)"
    ok=0
fi
((ok == 1))
