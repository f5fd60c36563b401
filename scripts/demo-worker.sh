#!/usr/bin/env bash
# The demo's second part: keypool-worker in front of the demo cluster. Keys come in with
# import-env from seed 004's variables (XAI_API_KEY, XAI_API_KEY_2, XAI_API_KEY_3), pointed at
# the mock provider since no real provider is reachable; then the OpenAI-compatible endpoint
# (an answer, a stream, failover around a 429) and the SQL request queue. The mock and the
# worker are stopped by PID at the end; the cluster keeps running.
#
# Usage: scripts/demo-worker.sh PORT DATABASE (called by scripts/demo.sh)
. "$(dirname "$0")/lib.sh"

PORT="$1"
DB="$2"
dir="$(cluster_dir demo)"

say "building keypool-worker (release)"
(cd "$REPO" && cargo build --release -q -p keypool-worker)
WORKER="$REPO/target/release/keypool-worker"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
psql_demo() { cluster_psql demo "$PORT" -d "$DB" -X -q -P footer=off "$@"; }
# Pretty-prints the parts of a JSON answer that matter, given as a Python expression over `v`.
show_json() { python3 -c "import json, sys; v = json.load(sys.stdin); print($1)"; }

mock_port=$(free_port)
"$WORKER" mock-provider --listen "127.0.0.1:$mock_port" >"$dir/demo-mock.log" 2>&1 &
pids+=($!)
MOCK="http://127.0.0.1:$mock_port"
for _ in $(seq 100); do curl -fs "$MOCK/_mock/stats" >/dev/null 2>&1 && break; sleep 0.1; done

export KEYPOOL_DATABASE_URL="host=$dir/sock port=$PORT user=postgres dbname=$DB"
export XAI_API_KEY="xai-demo-first-7Gq2mVx9TzL4pR8sK1wN"
export XAI_API_KEY_2="xai-demo-second-Hc5bYd3JfQ6uE0aM2vX"
export XAI_API_KEY_3="xai-demo-third-Pn8rWs4KgT1zL7yB3cD"
export XAI_BASE_URL="$MOCK/v1"

section "10. import-env: seed 004's XAI_API_KEY, XAI_API_KEY_2, XAI_API_KEY_3 become pool 'xai' (groups 1-3)"
"$WORKER" import-env --no-env-file --model grok-3-mini --rpm 60 --rpd 1000 --log warn
echo "-- and again: nothing is added twice"
"$WORKER" import-env --no-env-file --model grok-3-mini --rpm 60 --rpd 1000 --log warn | tail -n 1

section "11. keypool-worker serve: an OpenAI-compatible endpoint (apps present a token)"
worker_port=$(free_port)
TOKEN="demo-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
ADMIN_TOKEN="admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
KEYPOOL_API_TOKENS="$TOKEN" KEYPOOL_ADMIN_TOKENS="$ADMIN_TOKEN" KEYPOOL_LOG=info "$WORKER" serve --listen "127.0.0.1:$worker_port" \
    --worker-id demo-worker --heartbeat-interval 1s >"$dir/demo-worker.log" 2>&1 &
worker_pid=$!
pids+=("$worker_pid")
URL="http://127.0.0.1:$worker_port"
for _ in $(seq 100); do curl -fs "$URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "GET /healthz: $(curl -s "$URL/healthz")"
echo "GET /v1/models without a token: HTTP $(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/models")"
echo "GET /v1/models: $(curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/models" |
    show_json "', '.join(m['id'] for m in v['data'])")"

chat() { # chat USER [extra curl args...] -> body on stdout, headers in $dir/demo-headers
    local user="$1"
    shift
    curl -s -D "$dir/demo-headers" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
        "$URL/v1/chat/completions" "$@" \
        -d "{\"model\": \"grok-3-mini\", \"user\": \"$user\", \"max_tokens\": 8,
             \"messages\": [{\"role\": \"user\", \"content\": \"Say hello to the pool.\"}]}"
}
header() { grep -i "^$1:" "$dir/demo-headers" | cut -d' ' -f2- | tr -d '\r'; }

echo
echo "POST /v1/chat/completions {model: grok-3-mini, user: alice}:"
chat alice | show_json "'  reply: %r  usage: %s' % (v['choices'][0]['message']['content'], v['usage'])"
echo "  served by key $(header x-keypool-key-id) ($(header x-keypool-provider)), remaining today for alice:" \
    "$(header x-keypool-remaining-today) of $(header x-keypool-allocated-today), warning: $(header x-keypool-warning)"

echo
echo "The same with stream: true (server-sent events passed through as they arrive; first and last 3):"
body=$(curl -s -N -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' "$URL/v1/chat/completions" \
    -d '{"model": "grok-3-mini", "user": "alice", "max_tokens": 8, "stream": true,
         "messages": [{"role": "user", "content": "Say hello to the pool."}]}')
grep '^data:' <<<"$body" | head -n 3 | cut -c1-150
echo "  ..."
grep '^data:' <<<"$body" | tail -n 3 | cut -c1-150

section "12. The provider answers 429 for key 1: requests fail over, no error reaches the client"
curl -s -X POST "$MOCK/_mock/faults" -H 'Content-Type: application/json' \
    -d '{"match": "xai-demo-first", "fault": "429", "retry_after_s": 45}' >/dev/null
for u in bob carol dave erin; do
    code=$(chat "$u" -o /dev/null -w '%{http_code}')
    echo "  $u: HTTP $code, served by key $(header x-keypool-key-id) after $(header x-keypool-attempts) attempt(s)"
done
psql_demo -c "SELECT key_id, group_no, label, state, reason, cooling_until IS NOT NULL AS cooling
                FROM keypool_keys WHERE pool = 'xai' ORDER BY key_id"
echo "The worker's log names the key of every attempt (id and masked label, never the secret):"
grep -E 'user="?(carol|dave)"? ' "$dir/demo-worker.log" | sed -E 's/^[^ ]+ +//' | cut -c1-230

section "13. The SQL request queue: keypool_submit, a worker carries it out, keypool_result"
id=$(psql_demo -At -c "SELECT keypool_submit('frank', 'xai',
        '{\"messages\": [{\"role\": \"user\", \"content\": \"Queued hello\"}], \"max_tokens\": 6}')")
echo "SELECT keypool_submit('frank', 'xai', '{\"messages\": [...], \"max_tokens\": 6}') -> $id"
for _ in $(seq 100); do
    [[ "$(psql_demo -At -c "SELECT status FROM keypool_result($id)")" =~ ^(done|failed)$ ]] && break
    sleep 0.1
done
psql_demo -c "SELECT status, response -> 'choices' -> 0 -> 'message' ->> 'content' AS reply,
                     response -> 'usage' AS usage, error FROM keypool_result($id)"
psql_demo -c "SELECT id, user_id, pool, status, attempts, submitted_at < finished_at AS finished FROM keypool_requests ORDER BY id"

section "14. Heartbeats, and what the pool saw"
sleep 1.2
psql_demo -c "SELECT id, version, served, failed, queue_done, silent_for < interval '5 s' AS alive FROM keypool_workers"
psql_demo -c "SELECT account, model, rpm, requests_this_minute, rpd, requests_today, tokens_today
                FROM keypool_scopes s WHERE model = 'grok-3-mini' ORDER BY scope_id"

section "15. Operations over HTTP: metrics, the admin API, the user API, the dashboard"
echo "GET /metrics (some lines):"
curl -s "$URL/metrics" | grep -E '^keypool_(worker_provider_calls_total|worker_refusals_total|keys|health|pool_used_today)' \
    | grep -v ' 0$' | sed 's/^/  /'
echo "GET /allocation/system-overview without the admin token: HTTP $(curl -s -o /dev/null -w '%{http_code}' \
    -H "Authorization: Bearer $TOKEN" "$URL/allocation/system-overview")"
echo "GET /allocation/system-overview (health):"
curl -s -H "Authorization: Bearer $ADMIN_TOKEN" "$URL/allocation/system-overview" |
    python3 -c 'import json,sys; h=json.load(sys.stdin)["health"]; print("  " + h["status"] + ": " + h["message"] + "; " + str(h["requests_per_day"]) + " requests/day")'
echo "GET /allocation/daily?model=xai as alice: $(curl -s -H "Authorization: Bearer $TOKEN" \
    -H 'X-Keypool-User: alice' "$URL/allocation/daily?model=xai")"
echo "The operators' page: $URL/dashboard (asks for the admin token)"

section "16. SIGTERM: the worker finishes what is in flight and exits"
kill -TERM "$worker_pid"
wait "$worker_pid" && echo "keypool-worker exited with status 0"
tail -n 2 "$dir/demo-worker.log" | sed -E 's/^[^ ]+ +//' | cut -c1-200
