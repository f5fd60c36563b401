#!/usr/bin/env bash
# keypool-worker and LiteLLM's proxy side by side, against the same mock provider, in one run.
#
# LiteLLM (pinned below, with its proxy extra) and Redis (Debian's redis-server, unpacked, not
# installed as a service) go into target/vs-litellm/ if they are not there yet. Both gateways
# get the same keys and limits: two keys of 5 requests per minute per experiment; LiteLLM as its
# docs recommend for rate limits across replicas (usage-based-routing-v2, rpm per deployment,
# three replicas sharing Redis), keypool-worker as three workers on one database. Then
# bench/vs_litellm.py runs (a) the exactness experiments (1 and 3 replicas; a burst, spread over
# 15 s, across a minute boundary), counting what the mock received per key, and (b) throughput
# and latency at 1 and 64 connections in alternating rounds. The tables go to stdout and to
# bench/results/; the last line is `keypool-worker overshoot: N (LiteLLM: a, b, ...)`, and the
# script fails when N > 0.
#
# Not part of `make test`. About 5-8 minutes once installed (the boundary experiments wait for
# the clock's next minutes). Usage: bench/vs-litellm.sh   (BENCH_SECONDS=10 per throughput run)
. "$(dirname "$0")/../scripts/lib.sh"
. "$REPO/bench/peers.sh"

REDIS_PACKAGES=(redis-server redis-tools liblzf1 libjemalloc2)
SECONDS_EACH="${BENCH_SECONDS:-10}"
RPM=5
PORT="${KEYPOOL_BENCH_PORT:-54352}"
HERE="$LITELLM_HOME"

ensure_setup
ensure_wrk
# LiteLLM in a private venv, Redis unpacked into a private directory.
ensure_litellm
if [ ! -x "$HERE/redis/usr/bin/redis-server" ]; then
    say "unpacking Debian's redis-server into $HERE/redis"
    rm -rf "$HERE/debs" && mkdir -p "$HERE/debs" "$HERE/redis"
    (cd "$HERE/debs" && apt-get download -qq "${REDIS_PACKAGES[@]}" 2>/dev/null)
    for deb in "$HERE"/debs/*.deb; do dpkg -x "$deb" "$HERE/redis"; done
fi
REDIS_LIBS="$HERE/redis/usr/lib/x86_64-linux-gnu"

install_extension release
say "building keypool-worker (release)"
(cd "$REPO" && cargo build --release -q -p keypool-worker)
WORKER="$REPO/target/release/keypool-worker"

cluster_start vslitellm "$PORT" "max_connections = 200" "pg_keypool.flush_interval = '1h'"
dir="$(cluster_dir vslitellm)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cluster_stop vslitellm
}
trap cleanup EXIT


mock_port=$(free_port)
: >"$dir/calls.jsonl"
"$WORKER" mock-provider --listen "127.0.0.1:$mock_port" --call-log "$dir/calls.jsonl" >"$dir/mock.log" 2>&1 &
pids+=($!)
MOCK="http://127.0.0.1:$mock_port"
wait_for_url "$MOCK/_mock/stats" "the mock provider" "$dir/mock.log"
# Throughput runs against a second mock that keeps no call log.
mock2_port=$(free_port)
"$WORKER" mock-provider --listen "127.0.0.1:$mock2_port" >"$dir/mock2.log" 2>&1 &
pids+=($!)
MOCK2="http://127.0.0.1:$mock2_port"
wait_for_url "$MOCK2/_mock/stats" "the second mock provider" "$dir/mock2.log"

redis_port=$(free_port)
LD_LIBRARY_PATH="$REDIS_LIBS" "$HERE/redis/usr/bin/redis-server" --bind 127.0.0.1 --port "$redis_port" \
    --save '' --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
pids+=($!)

# The experiments: each gets two keys of its own (secrets end in a unique tail, which the
# mock's masked call log keeps).
RUN=$(date +%s)
experiments=()
n=0
for replicas in 1 3; do
    for pattern in burst spread boundary; do
        for gateway in keypool-worker LiteLLM; do
            n=$((n + 1))
            experiments+=("$n $gateway $replicas $pattern")
        done
    done
done
secret() { printf 'sk-vs%s-%s-000000000000%03d%s' "$RUN" "$1" "$2" "$3"; }

say "setting up pg_keypool: a pool per keypool-worker experiment, and 'bench' for throughput"
cluster_psql vslitellm "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS vs WITH (FORCE)" -c "CREATE DATABASE vs"
{
    echo "CREATE EXTENSION pg_keypool;"
    for e in "${experiments[@]}"; do
        read -r i gateway _ _ <<<"$e"
        [ "$gateway" = keypool-worker ] || continue
        echo "SELECT keypool_create_pool('exp$i');"
        for k in a b; do
            echo "SELECT keypool_add_key('exp$i', 'openai', '$(secret k "$i" "$k")', 'gpt-4o-mini', rpm => $RPM, base_url => '$MOCK/v1');"
        done
    done
    echo "SELECT keypool_create_pool('bench');"
    for k in a b; do
        echo "SELECT keypool_add_key('bench', 'openai', '$(secret k 999 "$k")', 'gpt-4o-mini', rpm => 2000000000, rpd => 2000000000, base_url => '$MOCK2/v1');"
    done
} | cluster_psql vslitellm "$PORT" -q -d vs -v ON_ERROR_STOP=1 >/dev/null

say "writing LiteLLM's config: a model group per LiteLLM experiment, and 'bench'"
MASTER="sk-vs-master-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
{
    echo "model_list:"
    deployment() {
        cat <<YAML
  - model_name: $1
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: $MOCK/v1
      api_key: $2
      rpm: $3
YAML
    }
    for e in "${experiments[@]}"; do
        read -r i gateway _ _ <<<"$e"
        [ "$gateway" = LiteLLM ] || continue
        for k in a b; do deployment "exp$i" "$(secret l "$i" "$k")" "$RPM"; done
    done
    for k in a b; do MOCK=$MOCK2 deployment bench "$(secret l 999 "$k")" 2000000000; done
    cat <<YAML
router_settings:
  routing_strategy: usage-based-routing-v2
  redis_host: 127.0.0.1
  redis_port: $redis_port
  num_retries: 0
litellm_settings:
  num_retries: 0
  request_timeout: 30
general_settings:
  master_key: $MASTER
YAML
} >"$dir/litellm.yaml"

say "starting three LiteLLM replicas and three keypool-workers"
TOKEN="vs-token-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
litellm_urls=()
worker_urls=()
for r in 1 2 3; do
    p=$(free_port)
    LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_TELEMETRY=False LITELLM_LOG=ERROR \
        "$HERE/venv/bin/litellm" --config "$dir/litellm.yaml" --host 127.0.0.1 --port "$p" >"$dir/litellm-$r.log" 2>&1 &
    pids+=($!)
    litellm_urls+=("http://127.0.0.1:$p")
    p=$(free_port)
    KEYPOOL_DATABASE_URL="host=$dir/sock port=$PORT user=postgres dbname=vs" KEYPOOL_API_TOKENS="$TOKEN" \
        KEYPOOL_LOG=warn "$WORKER" serve --no-queue --listen "127.0.0.1:$p" --db-pool-size 16 \
        >"$dir/worker-$r.log" 2>&1 &
    pids+=($!)
    worker_urls+=("http://127.0.0.1:$p")
done
for r in 0 1 2; do
    wait_for_url "${worker_urls[$r]}/healthz" "keypool-worker $((r + 1))" "$dir/worker-$((r + 1)).log"
    wait_for_url "${litellm_urls[$r]}/health/liveliness" "LiteLLM replica $((r + 1))" "$dir/litellm-$((r + 1)).log"
done

plan=$(python3 - "$dir" "$MOCK2" "$TOKEN" "$MASTER" "$RPM" "$SECONDS_EACH" "${worker_urls[*]}" "${litellm_urls[*]}" "${experiments[@]}" <<'PY'
import json, sys
d, mock, token, master, rpm, seconds, workers, litellms, *exps = sys.argv[1:]
workers, litellms = workers.split(), litellms.split()
out = []
for e in exps:
    i, gateway, replicas, pattern = e.split()
    ours = gateway == "keypool-worker"
    out.append({
        "gateway": gateway, "replicas": int(replicas), "pattern": pattern, "requests": 60,
        "urls": (workers if ours else litellms)[: int(replicas)],
        "model": f"exp{i}", "auth": token if ours else master,
        "key_tails": [f"{int(i):03d}a", f"{int(i):03d}b"],
    })
print(json.dumps({
    "workdir": d, "mock_log": f"{d}/calls.jsonl", "rpm": int(rpm), "experiments": out,
    "seconds": int(seconds), "rounds": 2, "connections": [1, 64],
    "targets": [
        {"name": "mock directly", "url": mock, "model": "gpt-4o-mini", "auth": "sk-direct-000000000000"},
        {"name": "keypool-worker (1 process)", "url": workers[0], "model": "bench", "auth": token},
        {"name": "LiteLLM proxy (1 replica)", "url": litellms[0], "model": "bench", "auth": master},
    ],
}))
PY
)

say "running the experiments (the boundary ones wait for the clock's next minutes)"
set +e
body=$(echo "$plan" | timeout 900 "$HERE/venv/bin/python" "$REPO/bench/vs_litellm.py")
status=$?
set -e
[ -n "$body" ] || { say "the driver failed (status $status)"; exit 1; }

out="$REPO/bench/results"
mkdir -p "$out"
report="$out/vs-litellm-$(date -u +%Y%m%dT%H%M%SZ).md"
{
    echo "$(date -u +%Y-%m-%d); $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')); pg_keypool $(git -C "$REPO" describe --always --dirty); litellm $LITELLM_VERSION (proxy, usage-based-routing-v2, Redis $(LD_LIBRARY_PATH="$REDIS_LIBS" "$HERE/redis/usr/bin/redis-server" --version 2>/dev/null | grep -o 'v=[0-9.]*' | cut -c3-)); mock provider without added latency"
    echo
    echo "$body"
} | tee "$report"
exit "$status"
