#!/usr/bin/env bash
# The tests that differ by PostgreSQL major, on a major other than the one the whole suite runs
# on (scripts/test.sh runs everything on 15): the pg_regress suite, and the integration tests of
# what touches the server's internals by major (shared memory and its restart, the state file,
# the keyring, failover to a standby, upgrades between releases).
# Usage: KEYPOOL_PG=18 scripts/test-major.sh (builds PostgreSQL 18 first if this machine has not).
. "$(dirname "$0")/lib.sh"

ensure_setup
cd "$REPO"

say "PostgreSQL $PG_MAJOR ($("$PG_CONFIG" --version)): building and installing pg_keypool"
install_extension debug

say "PostgreSQL $PG_MAJOR: pg_regress"
"$REPO/scripts/regress.sh"

say "PostgreSQL $PG_MAJOR: integration tests (restart, state file, keyring, failover, upgrade)"
cargo test -p keypool-tests --test restart --test keyring --test failover --test upgrade

say "PostgreSQL $PG_MAJOR: all passed"
