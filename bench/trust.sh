#!/usr/bin/env bash
# What the trust boundaries (issue 11) cost the hot path: keypool_reserve's TPS as a fraction of
# `SELECT 1`, at 32 clients, for the release before them (0.1.0) and the current build,
# measured alternately in one run on the same machine. Reservations are made by an application
# role (EXECUTE on the functions, and since 0.2.0 `use` on the pool), not a superuser, so that
# the privilege check runs as it does in production.
# Bars: the current build's ratio is at most 5 % below 0.1.0's, and at least 0.5.
#
# Usage: bench/trust.sh   (BENCH_SECONDS=10 per measurement, BENCH_ROUNDS=5 rounds)
#        BENCH_BASE=<commit> bench/trust.sh   compares with that commit of the current release
#        instead (same SQL version), e.g. the commit before a change to the hot path.
#        BENCH_MEMBERS=100000 bench/trust.sh  assigns that many other users to the pool first
#        (keypool_backfill), so that the reserving users are guests of a populated member table.
# Throughput on a shared 2-core machine drifts by tens of percent within minutes, so each
# reserve measurement is bracketed by two of `SELECT 1` (their mean is its baseline), and the
# builds alternate round by round.
# The 0.1.0 library is built from git (commit 8be9991, the frozen 0.1.0) in target/bench-0.1.0
# the first time (a release build, a few minutes).
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_EACH="${BENCH_SECONDS:-10}"
ROUNDS="${BENCH_ROUNDS:-5}"
PORT="${KEYPOOL_BENCH_PORT:-54341}"
CLIENTS=32
USERS=100000
MEMBERS="${BENCH_MEMBERS:-0}"
OLD_COMMIT="${BENCH_BASE:-8be9991}"
LIBDIR="$("$PG_CONFIG" --pkglibdir)"
version="$(grep -m1 '^version' "$REPO/Cargo.toml" | cut -d'"' -f2)"
if [[ -n "${BENCH_BASE:-}" ]]; then
    old_label="$version@$OLD_COMMIT"
    old_sql="$version"
else
    old_label=0.1.0
    old_sql=0.1.0
fi

ensure_setup
old_src="$REPO/target/bench-$OLD_COMMIT/src"
old_so="$REPO/target/bench-$OLD_COMMIT/pg_keypool.so"
if [[ ! -f "$old_so" ]]; then
    say "building pg_keypool $old_label (commit $OLD_COMMIT, release) for the comparison"
    rm -rf "$old_src"
    mkdir -p "$old_src"
    git -C "$REPO" archive "$OLD_COMMIT" | tar -x -C "$old_src"
    (cd "$old_src" && CARGO_TARGET_DIR="$REPO/target/bench-$OLD_COMMIT/target" cargo build --release -p pg_keypool --quiet)
    cp "$REPO/target/bench-$OLD_COMMIT/target/release/libpg_keypool.so" "$old_so"
fi
sharedir="$("$PG_CONFIG" --sharedir)/extension"
old_sql_file="$REPO/target/bench-$OLD_COMMIT/pg_keypool--$old_sql.sql"
if [[ -n "${BENCH_BASE:-}" && ! -f "$old_sql_file" ]]; then
    # The same version's install script as that commit generated it: the library and its SQL
    # objects must match (the result type of keypool_reserve may differ between commits).
    say "generating the install script of commit $OLD_COMMIT"
    (cd "$old_src/pg_keypool" && CARGO_TARGET_DIR="$REPO/target/bench-$OLD_COMMIT/target" \
        cargo pgrx schema pg15 --release --pg-config "$PG_CONFIG" -o "$old_sql_file" >/dev/null)
fi
install_extension release
new_so="$REPO/target/bench-current.so"
cp "$LIBDIR/pg_keypool.so" "$new_so"
new_sql_file="$REPO/target/bench-current.sql"
cp "$sharedir/pg_keypool--$version.sql" "$new_sql_file"

dir="$(cluster_dir trust-bench)"
trap 'cluster_stop trust-bench; install -m 755 "$new_so" "$LIBDIR/pg_keypool.so"; install -m 644 "$new_sql_file" "$sharedir/pg_keypool--$version.sql"' EXIT
work="$CLUSTER_ROOT/trust-bench-work"
install -d -m 755 "$work"
echo 'SELECT 1;' > "$work/select1.sql"
printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'user-:u'"'"', '"'"'bench'"'"');\n' "$USERS" > "$work/reserve-simple.sql"
printf '\\set u random(1, %s)\nSELECT keypool_reserve('"'"'user-'"'"' || :u, '"'"'bench'"'"');\n' "$USERS" > "$work/reserve-prepared.sql"
chmod 644 "$work"/*.sql
chmod 755 "$work"

tps() { # tps MODE SCRIPT
    as_postgres pgbench -n -h "$dir/sock" -p "$PORT" -U bench_app -M "$1" -c "$CLIENTS" -j 2 -T "$SECONDS_EACH" \
        -f "$2" bench 2>/dev/null | awk '/^tps = / { printf "%d", $3 }'
}

# measure BUILD: a new cluster with that library, a pool of 15 keys, an application role.
measure() {
    local build="$1" so sqlversion sql grant=""
    if [[ "$build" == old ]]; then so="$old_so"; sqlversion="$old_sql"; else so="$new_so"; sqlversion="$version"; fi
    cluster_stop trust-bench
    rm -rf "$dir"
    install -m 755 "$so" "$LIBDIR/pg_keypool.so"
    if [[ -n "${BENCH_BASE:-}" ]]; then
        if [[ "$build" == old ]]; then sql="$old_sql_file"; else sql="$new_sql_file"; fi
        install -m 644 "$sql" "$sharedir/pg_keypool--$version.sql"
    fi
    cluster_start trust-bench "$PORT" "max_connections = 200"
    [[ "$sqlversion" != 0.1.0 ]] && grant="SELECT keypool_grant('bench', 'bench_app', 'use');"
    cluster_psql trust-bench "$PORT" -q -d postgres -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE DATABASE bench;
\c bench
CREATE EXTENSION pg_keypool VERSION '$sqlversion';
SELECT keypool_create_pool('bench');
SELECT keypool_add_key('bench', 'openai', 'sk-bench-key-' || i || '-000000000', 'gpt-4o-mini',
                       rpm => 2000000000, rpd => 2000000000, tpm => 1000000000000, tpd => 1000000000000)
  FROM generate_series(1, 15) i;
CREATE ROLE bench_app LOGIN;
GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]) TO bench_app;
$grant
CREATE TABLE bench_members (id text PRIMARY KEY);
INSERT INTO bench_members SELECT 'member-' || i FROM generate_series(1, $MEMBERS) i;
SET client_min_messages = warning;
SELECT keypool_backfill('bench_members', 'id', 'bench') WHERE $MEMBERS > 0;
SQL
    SECONDS_EACH=3 tps prepared "$work/reserve-prepared.sql" >/dev/null || true
    # The extension's own work per call, without the client round trip: 300,000 reservations in
    # one statement, as the application role; the fastest of three.
    local best=""
    for _ in 1 2 3; do
        local us
        us=$(as_postgres psql -X -At -h "$dir/sock" -p "$PORT" -U bench_app -d bench -c \
            "SELECT round(1e6 * extract(epoch FROM clock_timestamp() - now()) / 300000, 3)
               FROM (SELECT count(*) FROM (SELECT keypool_reserve('user-' || (i % $USERS), 'bench') r
                                             FROM generate_series(1, 300000) i) s) x")
        if [[ -z "$best" ]] || awk -v a="$us" -v b="$best" 'BEGIN { exit !(a < b) }'; then best="$us"; fi
    done
    call_us[$build,$round]="$best"
    say "round $round, $build build: ${best} µs per reservation inside one statement"
    local before after
    for mode in simple prepared; do
        before=$(tps "$mode" "$work/select1.sql")
        res[$build,$mode,$round]=$(tps "$mode" "$work/reserve-$mode.sql")
        after=$(tps "$mode" "$work/select1.sql")
        base[$build,$mode,$round]=$(((before + after) / 2))
        say "round $round, $build build, $mode: SELECT 1 $before / $after TPS, reserve ${res[$build,$mode,$round]} TPS"
    done
}

declare -A base res call_us
for round in $(seq 1 "$ROUNDS"); do
    for build in old new; do
        measure "$build"
    done
done

ratio() { awk -v r="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? r / b : 0) }'; }
mean() { awk '{ s += $1; n++ } END { printf "%.3f", (n ? s / n : 0) }'; }
out="$REPO/bench/results"
mkdir -p "$out"
report="$out/trust-$(date -u +%Y%m%dT%H%M%SZ).md"
{
    echo "pgbench -j 2, $CLIENTS clients, ${SECONDS_EACH} s per run, $ROUNDS rounds alternating $old_label (commit $OLD_COMMIT) and $version;"
    echo "SELECT 1 is the mean of the runs just before and after the reserve run;"
    echo "synchronous_commit on, $(nproc) cores; reservations by an application role, random users out of $USERS (guests; $MEMBERS other users assigned as members); 15 keys"
    echo
    echo "| round | protocol | $old_label SELECT 1 | $old_label reserve | $old_label ratio | $version SELECT 1 | $version reserve | $version ratio |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|"
    for round in $(seq 1 "$ROUNDS"); do
        for mode in simple prepared; do
            echo "| $round | $mode | ${base[old,$mode,$round]} | ${res[old,$mode,$round]} | $(ratio "${res[old,$mode,$round]}" "${base[old,$mode,$round]}") | ${base[new,$mode,$round]} | ${res[new,$mode,$round]} | $(ratio "${res[new,$mode,$round]}" "${base[new,$mode,$round]}") |"
        done
    done
    echo
    echo "| round | $old_label µs per reservation in one statement | $version µs |"
    echo "|---:|---:|---:|"
    for round in $(seq 1 "$ROUNDS"); do
        echo "| $round | ${call_us[old,$round]} | ${call_us[new,$round]} |"
    done
    old_us=$(for r in $(seq 1 "$ROUNDS"); do echo "${call_us[old,$r]}"; done | mean)
    new_us=$(for r in $(seq 1 "$ROUNDS"); do echo "${call_us[new,$r]}"; done | mean)
    echo
    echo "inside one statement: $old_label $old_us µs, $version $new_us µs per reservation (mean of the rounds)"
    echo
    for mode in simple prepared; do
        old_mean=$(for r in $(seq 1 "$ROUNDS"); do ratio "${res[old,$mode,$r]}" "${base[old,$mode,$r]}"; echo; done | mean)
        new_mean=$(for r in $(seq 1 "$ROUNDS"); do ratio "${res[new,$mode,$r]}" "${base[new,$mode,$r]}"; echo; done | mean)
        drop=$(awk -v o="$old_mean" -v n="$new_mean" 'BEGIN { printf "%.1f", (o > 0 ? 100 * (o - n) / o : 0) }')
        verdict=met
        awk -v d="$drop" -v n="$new_mean" 'BEGIN { exit !(d <= 5 && n >= 0.5) }' || verdict="NOT met"
        echo "$mode protocol: mean ratio $old_label $old_mean, $version $new_mean: a drop of $drop % (bar: <= 5 % and >= 0.5: $verdict)"
    done
} > "$report"
cat "$report"
! grep -q "NOT met" "$report"
