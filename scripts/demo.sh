#!/usr/bin/env bash
# The main job: builds and installs pg_keypool, starts a private cluster with it preloaded,
# loads the example configuration of seed 003 and shows reservations, outcomes and state; then
# keypool-worker in front of it (scripts/demo-worker.sh); every key points at the mock provider. The cluster keeps running
# afterwards so that it can be explored; `make stop` stops it.
. "$(dirname "$0")/lib.sh"

PORT="${KEYPOOL_DEMO_PORT:-54330}"
ensure_setup
install_extension release
say "starting the demo cluster ($(cluster_dir demo), port $PORT)"
cluster_start demo "$PORT"
cluster_psql demo "$PORT" -q -d postgres -c "SET client_min_messages = warning" \
    -c "DROP DATABASE IF EXISTS keypool_demo WITH (FORCE)" -c "CREATE DATABASE keypool_demo"
cluster_psql demo "$PORT" -q -d keypool_demo -c "CREATE EXTENSION pg_keypool"

# No real provider is reachable: the demo's keys point at keypool-worker's mock provider, which
# runs until the demo ends (stopped by PID).
say "building keypool-worker (release)"
(cd "$REPO" && cargo build --release -q -p keypool-worker)
mock_port=$(free_port)
"$REPO/target/release/keypool-worker" mock-provider --listen "127.0.0.1:$mock_port" \
    >"$(cluster_dir demo)/demo-mock.log" 2>&1 &
mock_pid=$!
trap 'kill "$mock_pid" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
MOCK="http://127.0.0.1:$mock_port"
wait_for_url "$MOCK/_mock/stats" "the mock provider" "$(cluster_dir demo)/demo-mock.log" "$mock_pid"

cluster_psql demo "$PORT" -d keypool_demo -v mock_url="$MOCK" -f - < "$REPO/scripts/demo.sql"
"$REPO/scripts/demo-worker.sh" "$PORT" keypool_demo "$MOCK"
cat <<MSG

The demo cluster is still running. Explore it with:
    runuser -u postgres -- psql -h $(cluster_dir demo)/sock -p $PORT keypool_demo
Stop it with: make stop
MSG
