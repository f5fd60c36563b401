#!/usr/bin/env bash
# Soak under faults (issue 13): three workers on one database, HTTP and queue traffic from many
# users, the mock injecting 429 with retry-after, 503 bursts, hangs and a 401 key; one worker
# killed with kill -9 and started again; PostgreSQL restarted with -m immediate and with -m fast.
# Then the queue drains, and the mock's own log of calls (each with the grant time the workers
# stamp) is checked against every key's limits. Ends with `over-grants: N  lost: N  stuck: N` and
# fails when any is above 0. The scenario is worker/tests/soak.rs (make test runs it for 60 s).
#
# Usage: bench/soak.sh    (SOAK_SECONDS=300 by default)
. "$(dirname "$0")/../scripts/lib.sh"

ensure_setup
install_extension release
out="$REPO/bench/results"
mkdir -p "$out"
report="$out/soak-$(date -u +%Y%m%dT%H%M%SZ).md"
say "soak of ${SOAK_SECONDS:-300} s (release build)"
status=0
(cd "$REPO" && SOAK_SECONDS="${SOAK_SECONDS:-300}" SOAK_REPORT="$report" \
    cargo test --release -q -p keypool-worker --test soak -- --nocapture) || status=$?
[[ -f "$report" ]] && say "report: $report"
exit "$status"
