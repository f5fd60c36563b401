#!/usr/bin/env bash
# The demo's second part: keypool-worker in front of the demo cluster. Keys come in with
# import-env from seed 004's variables (XAI_API_KEY, XAI_API_KEY_2, XAI_API_KEY_3), pointed at
# the mock provider since no real provider is reachable; then the OpenAI-compatible endpoint
# (an answer, a stream, failover around a 429), the SQL request queue, and seed 003's three
# pools through Google's own API, a JSON schema and image generation. The worker is stopped by
# PID at the end; the cluster keeps running.
#
# Usage: scripts/demo-worker.sh PORT DATABASE MOCK_URL (called by scripts/demo.sh)
. "$(dirname "$0")/lib.sh"

PORT="$1"
DB="$2"
dir="$(cluster_dir demo)"

MOCK="$3"
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

section "16. Seed 003's three pools through the worker: Google's own API, a JSON schema, a tool, images"
echo "Sections 2-7 used this minute's chat and artifact requests; an operator's reset starts them afresh:"
psql_demo -c "SELECT p AS pool, keypool_reset_usage(p) AS scopes_reset FROM unnest(ARRAY['chat', 'artifact', 'image']) p"
gemini() { # gemini USER -> Google's generateContent on pool 'chat', as @google/genai sends it
    curl -s -D "$dir/demo-headers" -H "x-goog-api-key: $TOKEN" -H "X-Keypool-User: $1" -H 'Content-Type: application/json' \
        "$URL/v1beta/models/chat:generateContent" \
        -d '{"contents": [{"role": "user", "parts": [{"text": "Say hello to the chat pool."}]}],
             "generationConfig": {"maxOutputTokens": 16}}'
}
echo
echo "POST /v1beta/models/chat:generateContent (Google's own API; the token as x-goog-api-key), 2 keys x 2 RPM:"
for u in user-1 user-2 user-3 user-4 user-5; do
    gemini "$u" | show_json "'  $u: ' + (repr(v['candidates'][0]['content']['parts'][0]['text']) + ', usage %s' % v['usageMetadata']['totalTokenCount'] if 'candidates' in v else '%s %s' % (v['error']['code'], v['error']['status']))"
    if [ -n "$(header x-keypool-key-id)" ]; then
        echo "    served by key $(header x-keypool-key-id)"
    else
        echo "    refused in Google's error shape, retry-after: $(header retry-after) s"
    fi
done

echo
echo "POST /v1/chat/completions {model: artifact, response_format: json_schema} (generate-artifact on gemini-2.5-pro):"
curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' "$URL/v1/chat/completions" \
    -d '{"model": "artifact", "user": "user-1", "max_tokens": 200,
         "messages": [{"role": "user", "content": "Write a counter component."}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "artifact", "strict": true, "schema": {
             "type": "object", "additionalProperties": false, "required": ["title", "language", "code"],
             "properties": {"title": {"type": "string"}, "language": {"type": "string", "enum": ["tsx", "html"]},
                            "code": {"type": "string"}}}}}}' |
    show_json "'  content: ' + v['choices'][0]['message']['content']"

echo
echo "POST /v1/messages with a tool (Anthropic's Messages API, generate-artifact-fix on the same pool):"
curl -s -H "x-api-key: $TOKEN" -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' "$URL/v1/messages" \
    -d '{"model": "artifact", "max_tokens": 200, "metadata": {"user_id": "user-2"},
         "messages": [{"role": "user", "content": "The counter does not increment; fix it."}],
         "tools": [{"name": "apply_fix", "description": "Replaces the artifact code",
                    "input_schema": {"type": "object", "required": ["code"], "properties": {"code": {"type": "string"}}}}]}' |
    show_json "'  stop_reason: %s, blocks: %s' % (v['stop_reason'], [(b['type'], b.get('name'), b.get('input')) for b in v['content']])"

echo
echo "POST /v1/images/generations {model: image, n: 2, response_format: b64_json} (generate-image):"
curl -s -D "$dir/demo-headers" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    "$URL/v1/images/generations" \
    -d '{"model": "image", "user": "user-1", "prompt": "A lighthouse at dusk", "n": 2, "size": "1024x1024",
         "response_format": "b64_json"}' |
    show_json "'  ' + ', '.join('image %d: %s, %d bytes' % (i + 1, 'PNG' if __import__('base64').b64decode(d['b64_json']).startswith(b'\\x89PNG') else '?', len(__import__('base64').b64decode(d['b64_json']))) for i, d in enumerate(v['data']))"
echo "  (each image is its own reservation, counted against the key's RPM and RPD and the user's share)"
psql_demo -c "SELECT k.pool, s.model, sum(s.requests_this_minute) AS requests_this_minute, sum(s.rpm) AS rpm,
                     sum(s.requests_today) AS requests_today
                FROM keypool_scopes s JOIN keypool_keys k ON k.scope_id = s.scope_id
               WHERE k.pool IN ('chat', 'artifact', 'image') GROUP BY 1, 2 ORDER BY 1"

section "17. SIGTERM: the worker finishes what is in flight and exits"
kill -TERM "$worker_pid"
wait "$worker_pid" && echo "keypool-worker exited with status 0"
tail -n 2 "$dir/demo-worker.log" | sed -E 's/^[^ ]+ +//' | cut -c1-200
