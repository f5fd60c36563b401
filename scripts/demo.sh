#!/usr/bin/env bash
# The main job: builds and installs pg_keypool, starts a private cluster with it preloaded,
# loads the example configuration of seed 003 and shows reservations, outcomes and state; then
# keypool-worker against the mock provider (scripts/demo-worker.sh). The cluster keeps running
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
cluster_psql demo "$PORT" -d keypool_demo -f - < "$REPO/scripts/demo.sql"
"$REPO/scripts/demo-worker.sh" "$PORT" keypool_demo
cat <<MSG

The demo cluster is still running. Explore it with:
    runuser -u postgres -- psql -h $(cluster_dir demo)/sock -p $PORT keypool_demo
Stop it with: make stop
MSG
