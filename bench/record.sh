#!/usr/bin/env bash
# What the replicated record of use costs (issue 13): every pg_keypool.flush_interval the flusher
# writes each scope's day to keypool.scope_usage (rows that changed) and each active member's use
# of their share to keypool.member. Measured here with keypool_flush(), which does the same work,
# on 1,000 scopes and 100,000 members of whom 10,000 were active since the last flush: WAL bytes
# and time of a flush (first: rows inserted; then every scope and member changed; then nothing
# changed), split by relation with pg_walinspect, the share of HOT updates, and what that makes
# per hour at the default 10 s. No
# checkpoint is forced between flushes: full-page images come only with the server's own.
#
# Usage: bench/record.sh
. "$(dirname "$0")/../scripts/lib.sh"

PORT="${KEYPOOL_BENCH_PORT:-54343}"
SCOPES=1000
MEMBERS=100000
ACTIVE=10000

ensure_setup
install_extension release
rm -rf "$(cluster_dir record-bench)"
cluster_start record-bench "$PORT" "pg_keypool.flush_interval = '1h'" "max_connections = 50"
trap 'cluster_stop record-bench' EXIT

psql_bench() { cluster_psql record-bench "$PORT" -X -q -At -v ON_ERROR_STOP=1 -d postgres "$@"; }

psql_bench <<SQL >/dev/null
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('p');
SELECT count(keypool_add_key('p', 'openai', 'sk-record-bench-' || lpad(i::text, 6, '0') || '-0000000',
                             account => 'acct-' || i, rpm => 1000000, rpd => 100000000))
  FROM generate_series(1, $SCOPES) i;
SELECT count(keypool_assign('user-' || i, 'p')) FROM generate_series(1, $MEMBERS) i;
SELECT keypool_flush();
SQL

# One flush after `work` (SQL run first): "label|WAL bytes|ms|WAL bytes by relation".
measure() {
    local label="$1" work="$2"
    psql_bench <<SQL
$work
CREATE TEMP TABLE m AS SELECT pg_current_wal_insert_lsn() AS lsn, clock_timestamp() AS t;
SELECT keypool_flush();
CREATE TEMP TABLE e AS SELECT pg_current_wal_insert_lsn() AS lsn, clock_timestamp() AS t;
SELECT '$label', e.lsn - m.lsn, round(extract(epoch FROM e.t - m.t) * 1000, 1),
       (SELECT string_agg(rel || ' ' || bytes, ', ' ORDER BY bytes DESC)
          FROM (SELECT coalesce(c.relname, 'other') AS rel, sum(w.record_length) AS bytes
                  FROM pg_get_wal_records_info(m.lsn, e.lsn) w
                  LEFT JOIN pg_class c
                    ON c.relfilenode = (regexp_match(w.block_ref, 'rel [0-9]+/[0-9]+/([0-9]+)'))[1]::oid
                 GROUP BY 1) x)
  FROM m, e;
SQL
}

psql_bench -c "CREATE EXTENSION pg_walinspect" >/dev/null
reserve_all="SELECT count(*) FROM (SELECT keypool_reserve('user-' || i, 'p') FROM generate_series(1, $ACTIVE) i) s;
SELECT count(*) FROM (SELECT keypool_reserve('user-' || (i % $MEMBERS), 'p') FROM generate_series(1, $SCOPES) i) s;"

rows=()
rows+=("$(measure "first record: $SCOPES scopes, $ACTIVE members (inserts and first updates)" "$reserve_all" | tail -1)")
psql_bench -c "SELECT pg_stat_reset()" >/dev/null
rows+=("$(measure "every scope and $ACTIVE members changed" "$reserve_all" | tail -1)")
# The measuring session has exited, so its counts are in the statistics now.
hot="$(psql_bench -c "SELECT relname || ': ' || n_tup_hot_upd || ' of ' || n_tup_upd || ' updates HOT'
                        FROM pg_stat_user_tables WHERE relname IN ('scope_usage', 'member') ORDER BY relname" | paste -sd ';' -)"
rows+=("$(measure "nothing changed" "" | tail -1)")

out="$REPO/bench/results"
mkdir -p "$out"
report="$out/record-$(date -u +%Y%m%dT%H%M%SZ).md"
{
    echo "keypool_flush() on $SCOPES scopes and $MEMBERS members ($(nproc) cores); WAL from pg_current_wal_insert_lsn()"
    echo
    echo "| flush | WAL bytes | ms | WAL bytes by relation (history: usage_hourly; record: scope_usage, usage_snapshot, member) |"
    echo "|---|---:|---:|---|"
    for r in "${rows[@]}"; do
        IFS='|' read -r label wal ms by <<<"$r"
        echo "| $label | $wal | $ms | $by |"
    done
    echo
    echo "HOT updates in the second flush: $hot"
    IFS='|' read -r _ wal ms _ <<<"${rows[1]}"
    echo
    echo "at the default flush_interval (10 s), with all of it changing every time: $(awk -v w="$wal" 'BEGIN { printf "%.1f", w * 360 / 1048576 }') MiB of WAL and $(awk -v m="$ms" 'BEGIN { printf "%.1f", m * 360 / 1000 }') s of one core per hour"
} >"$report"
cat "$report"
