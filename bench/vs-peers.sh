#!/usr/bin/env bash
# keypool-worker beside Portkey's open-source gateway and LiteLLM's proxy, on the same mock
# provider, in one run: requests/s at 1 and 64 connections and the p50 overhead at one
# connection (each gateway's median minus the mock's, same route), on every route all three
# serve: OpenAI chat (`/v1/chat/completions`), OpenAI Responses (`/v1/responses`) and Anthropic
# Messages (`/v1/messages`). bench/vs_peers.py measures (alternating rounds) and writes the
# tables to stdout and bench/results/.
#
# Each gateway takes each route its usual way: keypool-worker reserves and settles in
# PostgreSQL, calls the mock's chat completions for Responses on an OpenAI key (it keeps no
# provider state) and passes Messages through to an Anthropic key; Portkey and LiteLLM pass
# Responses through to the mock's /v1/responses and Messages to its /v1/messages. Portkey's
# open-source gateway keeps no limits, no users and no accounting, so only speed is compared
# with it; LiteLLM runs as one replica with its default routing (its exactness under limits is
# bench/vs-litellm.sh's).
#
# Bars (issue 27): keypool-worker's requests/s at 64 connections >= 3 x Portkey's on every
# route, and its p50 overhead at one connection below Portkey's; the script fails otherwise.
#
# Not part of `make test`. About 10 minutes once installed. Usage: bench/vs-peers.sh
#   (BENCH_SECONDS=8 per measurement, BENCH_ROUNDS=2)
. "$(dirname "$0")/../scripts/lib.sh"
. "$REPO/bench/peers.sh"

SECONDS_EACH="${BENCH_SECONDS:-8}"
ROUNDS="${BENCH_ROUNDS:-2}"
PORT="${KEYPOOL_BENCH_PORT:-54353}"

ensure_setup
ensure_wrk
ensure_litellm
ensure_portkey
install_extension release
say "building keypool-worker (release)"
(cd "$REPO" && cargo build --release -q -p keypool-worker)
WORKER="$REPO/target/release/keypool-worker"

cluster_start vspeers "$PORT" "max_connections = 200" "pg_keypool.flush_interval = '1h'"
dir="$(cluster_dir vspeers)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cluster_stop vspeers
}
trap cleanup EXIT

mock_port=$(free_port)
"$WORKER" mock-provider --listen "127.0.0.1:$mock_port" >"$dir/mock.log" 2>&1 &
pids+=($!)
MOCK="http://127.0.0.1:$mock_port"
wait_for_url "$MOCK/_mock/stats" "the mock provider" "$dir/mock.log" "${pids[-1]}"

say "setting up pg_keypool: pool 'bench' (an OpenAI key) and 'bench-ant' (an Anthropic key), limits out of reach"
cluster_psql vspeers "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS vs WITH (FORCE)" -c "CREATE DATABASE vs"
cluster_psql vspeers "$PORT" -q -d vs -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('bench');
SELECT keypool_add_key('bench', 'openai', 'sk-peers-openai-000000000001', 'gpt-4o-mini',
                       rpm => 2000000000, rpd => 2000000000, base_url => '$MOCK/v1');
SELECT keypool_create_pool('bench-ant');
SELECT keypool_add_key('bench-ant', 'anthropic', 'sk-ant-peers-00000000000001', 'claude-sonnet-4-5',
                       rpm => 2000000000, rpd => 2000000000, base_url => '$MOCK');
SQL

say "starting keypool-worker, Portkey's gateway and LiteLLM's proxy"
TOKEN="peers-token-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
worker_port=$(free_port)
KEYPOOL_DATABASE_URL="host=$dir/sock port=$PORT user=postgres dbname=vs" KEYPOOL_API_TOKENS="$TOKEN" \
    KEYPOOL_LOG=warn "$WORKER" serve --no-queue --listen "127.0.0.1:$worker_port" --db-pool-size 16 \
    >"$dir/worker.log" 2>&1 &
pids+=($!)
wait_for_url "http://127.0.0.1:$worker_port/healthz" keypool-worker "$dir/worker.log" "${pids[-1]}"

portkey_port=$(free_port)
node "$PORTKEY_SERVER" --port="$portkey_port" --headless >"$dir/portkey.log" 2>&1 &
pids+=($!)
# Portkey's gateway answers GET / once it listens.
wait_for_url "http://127.0.0.1:$portkey_port/" "Portkey's gateway" "$dir/portkey.log" "${pids[-1]}"

MASTER="sk-peers-master-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
cat >"$dir/litellm.yaml" <<YAML
model_list:
  - model_name: bench
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: $MOCK/v1
      api_key: sk-peers-litellm-000000000001
  - model_name: bench-ant
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: $MOCK
      api_key: sk-ant-peers-litellm-0000000001
litellm_settings:
  num_retries: 0
  request_timeout: 30
general_settings:
  master_key: $MASTER
YAML
litellm_port=$(free_port)
LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_TELEMETRY=False LITELLM_LOG=ERROR \
    "$LITELLM_HOME/venv/bin/litellm" --config "$dir/litellm.yaml" --host 127.0.0.1 --port "$litellm_port" \
    >"$dir/litellm.log" 2>&1 &
pids+=($!)
wait_for_url "http://127.0.0.1:$litellm_port/health/liveliness" "LiteLLM's proxy" "$dir/litellm.log" "${pids[-1]}"

plan=$(python3 - "$dir" "$SECONDS_EACH" "$ROUNDS" "$MOCK" "$worker_port" "$TOKEN" "$portkey_port" "$litellm_port" "$MASTER" <<'PY'
import json, sys
d, seconds, rounds, mock, worker_port, token, portkey_port, litellm_port, master = sys.argv[1:]
prompt = "Say something short about key pools."
routes = {
    "chat": {"path": "/v1/chat/completions",
             "body": json.dumps({"model": "{model}", "user": "{user}", "max_tokens": 16,
                                 "messages": [{"role": "user", "content": prompt}]})},
    "responses": {"path": "/v1/responses",
                  "body": json.dumps({"model": "{model}", "user": "{user}", "max_output_tokens": 16, "input": prompt})},
    "messages": {"path": "/v1/messages",
                 "body": json.dumps({"model": "{model}", "max_tokens": 16, "metadata": {"user_id": "{user}"},
                                     "messages": [{"role": "user", "content": prompt}]})},
}
anthropic = {"anthropic-version": "2023-06-01"}
def openai_key(secret): return {"Authorization": f"Bearer {secret}"}
portkey_openai = dict(openai_key("sk-peers-portkey-000000000001"),
                      **{"x-portkey-provider": "openai", "x-portkey-custom-host": f"{mock}/v1"})
portkey_anthropic = dict(anthropic, **{"x-api-key": "sk-ant-peers-portkey-0000000001",
                                       "x-portkey-provider": "anthropic", "x-portkey-custom-host": f"{mock}/v1"})
targets = [
    {"name": "mock directly", "url": mock, "routes": {
        "chat": {"model": "gpt-4o-mini", "headers": openai_key("sk-peers-direct-000000000001"), "upstream": ""},
        "responses": {"model": "gpt-4o-mini", "headers": openai_key("sk-peers-direct-000000000001"), "upstream": ""},
        "messages": {"model": "claude-sonnet-4-5", "headers": dict(anthropic, **{"x-api-key": "sk-ant-peers-direct-00000001"}), "upstream": ""}}},
    {"name": "keypool-worker", "url": f"http://127.0.0.1:{worker_port}", "routes": {
        "chat": {"model": "bench", "headers": openai_key(token), "upstream": "chat completions"},
        "responses": {"model": "bench", "headers": openai_key(token), "upstream": "chat completions"},
        "messages": {"model": "bench-ant", "headers": dict(anthropic, **{"x-api-key": token}), "upstream": "messages"}}},
    {"name": "Portkey gateway", "url": f"http://127.0.0.1:{portkey_port}", "routes": {
        "chat": {"model": "gpt-4o-mini", "headers": portkey_openai, "upstream": "chat completions"},
        "responses": {"model": "gpt-4o-mini", "headers": portkey_openai, "upstream": "responses"},
        "messages": {"model": "claude-sonnet-4-5", "headers": portkey_anthropic, "upstream": "messages"}}},
    {"name": "LiteLLM proxy", "url": f"http://127.0.0.1:{litellm_port}", "routes": {
        "chat": {"model": "bench", "headers": openai_key(master), "upstream": "chat completions"},
        "responses": {"model": "bench", "headers": openai_key(master), "upstream": "responses"},
        "messages": {"model": "bench-ant", "headers": openai_key(master), "upstream": "messages"}}},
]
print(json.dumps({"workdir": d, "seconds": int(seconds), "rounds": int(rounds), "connections": [1, 64],
                  "routes": routes, "targets": targets, "bar_peer": "Portkey gateway"}))
PY
)

say "measuring (${SECONDS_EACH} s per measurement, $ROUNDS rounds)"
set +e
body=$(echo "$plan" | timeout 1800 python3 "$REPO/bench/vs_peers.py")
status=$?
set -e
[ -n "$body" ] || { say "the driver failed (status $status)"; exit 1; }

out="$REPO/bench/results"
mkdir -p "$out"
report="$out/vs-peers-$(date -u +%Y%m%dT%H%M%SZ).md"
portkey_version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$PORTKEY_HOME/node_modules/@portkey-ai/gateway/package.json")
{
    echo "$(date -u +%Y-%m-%d); $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')); pg_keypool $(git -C "$REPO" describe --always --dirty); @portkey-ai/gateway $portkey_version (node $(node --version)); litellm $LITELLM_VERSION (proxy, 1 replica)"
    echo
    echo "$body"
} | tee "$report"
exit "$status"
