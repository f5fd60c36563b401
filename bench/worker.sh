#!/usr/bin/env bash
# Benchmark of the worker: requests per second and latency of POST /v1/chat/completions through
# keypool-worker (reserve, call, settle) against the mock provider, compared in the same run
# with calling the mock directly. wrk drives both with the same body; every request names a
# random user out of 100,000 in a pool of 15 keys whose limits the run cannot reach.
#
# Bars (issue 4): >= 5,000 requests/s through the worker, and p50 overhead <= 1 ms (the
# difference of the medians at one connection, where latency is not queueing). Issue 12: the
# same requests with an API token from the database (keypool_create_api_token, bound to the
# pool) instead of a service token from KEYPOOL_API_TOKENS, measured right after them: requests/s
# within 10 % at every connection count, and p50 within 0.05 ms at one connection.
#
# Usage: bench/worker.sh    (BENCH_SECONDS=15 per measurement by default; BENCH_WORKER=<binary>
#        runs another build of the worker, e.g. an earlier commit's, for a before/after)
. "$(dirname "$0")/../scripts/lib.sh"

SECONDS_EACH="${BENCH_SECONDS:-15}"
PORT="${KEYPOOL_BENCH_PORT:-54342}"
CONNECTIONS=(1 8 32 64)

ensure_setup
if ! command -v wrk >/dev/null; then
    say "installing wrk"
    apt-get install -y -qq wrk >/dev/null
fi
install_extension release
say "building keypool-worker (release)"
(cd "$REPO" && cargo build --release -q -p keypool-worker)
# BENCH_WORKER=<binary> measures another build (say, an earlier commit's) against this database.
WORKER="${BENCH_WORKER:-$REPO/target/release/keypool-worker}"

cluster_start benchw "$PORT" "max_connections = 200" "pg_keypool.flush_interval = '1h'"
dir="$(cluster_dir benchw)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cluster_stop benchw
}
trap cleanup EXIT


say "starting the mock provider"
mock_port=$(free_port)
"$WORKER" mock-provider --listen "127.0.0.1:$mock_port" >"$dir/mock.log" 2>&1 &
pids+=($!)
MOCK="http://127.0.0.1:$mock_port"

say "setting up database bench: pool 'bench' with 15 keys on the mock"
cluster_psql benchw "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" -c "CREATE DATABASE bench"
cluster_psql benchw "$PORT" -q -d bench -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('bench');
SELECT keypool_add_key('bench', 'openai', 'sk-bench-key-' || i || '-000000000', 'gpt-4o-mini',
                       rpm => 2000000000, rpd => 2000000000, tpm => 1000000000000, tpd => 1000000000000,
                       base_url => '$MOCK/v1')
  FROM generate_series(1, 15) i;
SQL

DB_TOKEN=$(cluster_psql benchw "$PORT" -d bench -At -c "SELECT keypool_create_api_token('bench', NULL, ARRAY['bench'])")

say "starting keypool-worker"
worker_port=$(free_port)
TOKEN="bench-token-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
KEYPOOL_DATABASE_URL="host=$dir/sock port=$PORT user=postgres dbname=bench" KEYPOOL_API_TOKENS="$TOKEN" \
    KEYPOOL_LOG=warn "$WORKER" serve --no-queue --listen "127.0.0.1:$worker_port" --db-pool-size 16 \
    >"$dir/worker.log" 2>&1 &
pids+=($!)
WORKER_URL="http://127.0.0.1:$worker_port"
wait_for_url "$WORKER_URL/healthz" keypool-worker "$dir/worker.log" "${pids[-1]}"

# The same body both ways (model: the pool for the worker, the model for the mock).
cat >"$dir/chat.lua" <<'LUA'
local model = os.getenv("BENCH_MODEL")
local auth = "Bearer " .. os.getenv("BENCH_AUTH")
math.randomseed(os.time())
request = function()
    local body = string.format(
        '{"model":"%s","user":"user-%d","max_tokens":16,"messages":[{"role":"user","content":"Say something short about key pools."}]}',
        model, math.random(1, 100000))
    return wrk.format("POST", "/v1/chat/completions",
        {["Content-Type"] = "application/json", ["Authorization"] = auth}, body)
end
LUA

# run TARGET URL MODEL AUTH CONNECTIONS -> "rps p50_ms p99_ms errors requests"
run() {
    local out
    out=$(BENCH_MODEL="$3" BENCH_AUTH="$4" wrk -t "$(( $5 < 2 ? 1 : 2 ))" -c "$5" -d "${SECONDS_EACH}s" --latency -s "$dir/chat.lua" "$2" 2>&1)
    echo "$out" >>"$dir/wrk.log"
    echo "$out" | awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /Requests\/sec:/ { rps = $2 }
        /^ +50%/ { p50 = ms($2) }
        /^ +99%/ { p99 = ms($2) }
        /Non-2xx/ { errors = $5 }
        /Socket errors/ { errors += 1 }
        / requests in / { total = $1 }
        END { printf "%d %.3f %.3f %d %d\n", rps, p50, p99, errors, total }'
}

say "warming up"
read -r _ _ _ _ sent < <(run worker "$WORKER_URL" bench "$TOKEN" 8)

read -r _ _ _ _ warm < <(run worker "$WORKER_URL" bench "$DB_TOKEN" 8)
sent=$((sent + warm))

results=()
for c in "${CONNECTIONS[@]}"; do
    say "$c connection(s): mock directly, then through the worker with a service token and with an API token, in turns (${SECONDS_EACH} s each)"
    read -r d_rps d_p50 d_p99 d_err _ < <(run direct "$MOCK" gpt-4o-mini sk-bench-direct-0000000 "$c")
    # Which token goes first alternates, so that neither gains from running second.
    if ((${#results[@]} % 2 == 0)); then
        read -r w_rps w_p50 w_p99 w_err w_total < <(run worker "$WORKER_URL" bench "$TOKEN" "$c")
        read -r t_rps t_p50 t_p99 t_err t_total < <(run worker "$WORKER_URL" bench "$DB_TOKEN" "$c")
    else
        read -r t_rps t_p50 t_p99 t_err t_total < <(run worker "$WORKER_URL" bench "$DB_TOKEN" "$c")
        read -r w_rps w_p50 w_p99 w_err w_total < <(run worker "$WORKER_URL" bench "$TOKEN" "$c")
    fi
    sent=$((sent + w_total + t_total))
    results+=("$c $d_rps $d_p50 $d_p99 $w_rps $w_p50 $w_p99 $t_rps $t_p50 $t_p99 $((d_err + w_err + t_err))")
done

# Every request through the worker was reserved and settled: the scopes' request counts today
# match what wrk sent (settlements are sent in the background; give them a moment).
sleep 1
settled=$(cluster_psql benchw "$PORT" -d bench -At -c "SELECT sum(requests_today) FROM keypool_scopes")

out="$REPO/bench/results"
mkdir -p "$out"
report="$out/worker-$(date -u +%Y%m%dT%H%M%SZ).md"
{
echo "wrk, ${SECONDS_EACH} s per measurement, $(nproc) cores; POST /v1/chat/completions, max_tokens 16, random users out of 100,000; 15 keys on the mock provider; worker with --db-pool-size 16"
echo
echo "| connections | mock direct req/s | p50 ms | p99 ms | through worker req/s | p50 ms | p99 ms | ratio | p50 overhead ms | with an API token req/s | p50 ms | p99 ms | API / service token | errors |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for r in "${results[@]}"; do
    read -r c d_rps d_p50 d_p99 w_rps w_p50 w_p99 t_rps t_p50 t_p99 errs <<<"$r"
    awk -v c="$c" -v dr="$d_rps" -v d5="$d_p50" -v d9="$d_p99" -v wr="$w_rps" -v w5="$w_p50" -v w9="$w_p99" \
        -v tr="$t_rps" -v t5="$t_p50" -v t9="$t_p99" -v e="$errs" \
        'BEGIN { printf "| %d | %d | %.3f | %.3f | %d | %.3f | %.3f | %.2f | %.3f | %d | %.3f | %.3f | %.3f | %d |\n", c, dr, d5, d9, wr, w5, w9, wr / dr, w5 - d5, tr, t5, t9, tr / wr, e }'
done
echo
echo "requests sent through the worker: $sent; reserved and settled in the database: $settled"
} | tee "$report"

best_rps=0
overhead=""
token_p50=""
worst_ratio=""
errors=0
for r in "${results[@]}"; do
    read -r c d_rps d_p50 _ w_rps w_p50 _ t_rps t_p50 _ errs <<<"$r"
    ((w_rps > best_rps)) && best_rps=$w_rps
    ((c == 1)) && overhead=$(awk -v a="$w_p50" -v b="$d_p50" 'BEGIN { printf "%.3f", a - b }')
    ((c == 1)) && token_p50=$(awk -v a="$t_p50" -v b="$w_p50" 'BEGIN { printf "%.3f", a - b }')
    worst_ratio=$(awk -v t="$t_rps" -v w="$w_rps" -v prev="$worst_ratio" \
        'BEGIN { r = t / w; if (prev != "" && prev + 0 < r) r = prev; printf "%.3f", r }')
    errors=$((errors + errs))
done
echo "bar: >= 5000 req/s through the worker: best $best_rps; p50 overhead at 1 connection <= 1 ms: $overhead ms; errors: $errors"
echo "bar: API tokens: req/s >= 0.90 x service tokens at every connection count: worst $worst_ratio; p50 at 1 connection within 0.05 ms: $token_p50 ms"
if ((best_rps >= 5000)) && awk -v o="$overhead" 'BEGIN { exit !(o <= 1.0) }' && ((errors == 0)) &&
    awk -v r="$worst_ratio" -v d="$token_p50" 'BEGIN { exit !(r >= 0.90 && d <= 0.05 && d >= -0.05) }'; then
    echo "PASS"
else
    echo "FAIL"
    exit 1
fi
