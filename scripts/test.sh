#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit tests and #[pg_test]s, the pg_regress suite,
# the examples of the docs, the book, and the integration tests against private clusters (the extension's, and the worker's against
# the mock provider, the official OpenAI Python client and headless Chromium for the dashboard),
# the version-sensitive tests on the other PostgreSQL majors (scripts/test-major.sh), and last the
# Debian packages (built, installed with dpkg, tested, removed).
# Sets up the machine first if needed.
. "$(dirname "$0")/lib.sh"

ensure_setup
cd "$REPO"

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "unit tests and #[pg_test]s (cargo pgrx test)"
stop_all_clusters
install -d -o postgres -g postgres "$CLUSTER_ROOT/pgrx-test"
(cd pg_keypool && cargo pgrx test pg15 --runas postgres --pgdata "$CLUSTER_ROOT/pgrx-test")

# cargo pgrx test leaves its test build installed: install the real one.
install_extension debug

say "pg_regress"
"$REPO/scripts/regress.sh"

say "the examples of README.md and the book (scripts/test-docs.sh), and the book itself (make docs)"
"$REPO/scripts/test-docs.sh"
"$REPO/scripts/docs.sh"

say "integration tests (engine over tokio-postgres; worker against the mock provider)"
ensure_python_client
ensure_browser
cargo test --workspace --exclude pg_keypool

# The other majors: pg_regress and the version-sensitive integration tests (builds PostgreSQL 18
# from Debian's source package once per machine).
for major in "${PG_MAJORS[@]:1}"; do
    say "PostgreSQL $major: scripts/test-major.sh"
    KEYPOOL_PG="$major" "$REPO/scripts/test-major.sh"
done

say "Debian 13 and its PostgreSQL 17: the package, pg_regress, pg_upgrade from 15 (scripts/test-debian13.sh)"
"$REPO/scripts/test-debian13.sh"

say "the Debian packages, installed as a user installs them (scripts/test-packages.sh)"
"$REPO/scripts/test-packages.sh"

say "all tests passed"
