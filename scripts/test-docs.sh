#!/usr/bin/env bash
# Runs every example of README.md and the docs (docs/src) against a real cluster, so that the docs cannot drift
# from the code: each page's SQL blocks in order in a fresh database (psql, ON_ERROR_STOP, as a
# superuser, CREATE EXTENSION done), then its shell blocks (bash -euo pipefail, PG* variables
# pointing at that database). Roles a page creates are dropped after it. Blocks marked `no_run`
# (commands for the reader's own machine) are counted and listed, not run.
# Then checks itself: a page with a broken SQL example must fail.
#
# Usage: scripts/test-docs.sh          (make test runs it after pg_regress)
. "$(dirname "$0")/lib.sh"

PORT="${KEYPOOL_DOCS_PORT:-54350}"
ensure_setup
[[ -f "$("$PG_CONFIG" --pkglibdir)/pg_keypool.so" ]] || install_extension debug

work="$(mktemp -d)"
chmod 755 "$work"
trap 'cluster_stop docs; rm -rf "$work"' EXIT
cluster_stop docs
rm -rf "$(cluster_dir docs)"
cluster_start docs "$PORT"
sock="$(cluster_dir docs)/sock"

# run_pages SRC [PAGE...]: runs PAGE (README.md) and every page of SRC; fails at the first
# example that fails.
run_pages() {
    local src="$1" out="$work/$(basename "$(dirname "$1")")-$RANDOM"
    shift
    mkdir -p "$out"
    python3 "$REPO/scripts/docs_examples.py" "$src" "$out" "$@" >"$out/pages"
    chmod -R a+rX "$out"
    local stem nsql nsh skipped db roles_before new_roles total_sql=0 total_sh=0 total_skipped=0
    while read -r stem nsql nsh skipped; do
        total_sql=$((total_sql + nsql))
        total_sh=$((total_sh + nsh))
        total_skipped=$((total_skipped + skipped))
        [[ -f "$out/$stem.sql" || -f "$out/$stem.sh" ]] || continue
        db="docs_$(echo "${stem,,}" | tr -c "a-z0-9\n" _)"
        roles_before="$(cluster_psql docs "$PORT" -d postgres -Atc "SELECT string_agg(quote_literal(rolname), ',') FROM pg_roles")"
        cluster_psql docs "$PORT" -d postgres -q -v ON_ERROR_STOP=1 \
            -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
        cluster_psql docs "$PORT" -d "$db" -q -v ON_ERROR_STOP=1 -c "CREATE EXTENSION pg_keypool" >/dev/null
        if [[ -f "$out/$stem.sql" ]]; then
            if ! cluster_psql docs "$PORT" -d "$db" -q -v ON_ERROR_STOP=1 -f "$out/$stem.sql" >"$out/$stem.out" 2>&1; then
                local at line
                line="$(grep -o "psql:$out/$stem.sql:[0-9]*" "$out/$stem.out" | head -1 | awk -F: '{ print $NF }')"
                at="$(head -n "${line:-1}" "$out/$stem.sql" | grep '^-- ' | tail -1 | cut -c4-)"
                say "docs example failed: $at (the block starting there)"
                tail -n 5 "$out/$stem.out" >&2
                return 1
            fi
        fi
        if [[ -f "$out/$stem.sh" ]]; then
            if ! (cd "$out" && PGHOST="$sock" PGPORT="$PORT" PGUSER=postgres PGDATABASE="$db" \
                PATH="$REPO/target/debug:$PATH" runuser -u postgres --preserve-environment -- \
                bash -euo pipefail "$out/$stem.sh" >"$out/$stem.sh.out" 2>&1); then
                say "docs shell example failed: $(grep '^--- ' "$out/$stem.sh.out" | tail -1 | cut -c5-)"
                tail -n 5 "$out/$stem.sh.out" >&2
                return 1
            fi
        fi
        cluster_psql docs "$PORT" -d postgres -q -c "DROP DATABASE $db WITH (FORCE)" >/dev/null
        new_roles="$(cluster_psql docs "$PORT" -d postgres -Atc \
            "SELECT string_agg(quote_ident(rolname), ', ') FROM pg_roles WHERE rolname NOT IN ($roles_before)")"
        [[ -z "$new_roles" ]] || cluster_psql docs "$PORT" -d postgres -q -c "DROP ROLE $new_roles" >/dev/null
    done <"$out/pages"
    say "docs: $total_sql SQL and $total_sh shell examples ran; $total_skipped marked no_run"
}

say "running every example of docs/src against a private cluster"
run_pages "$REPO/docs/src" "$REPO/README.md"

say "a broken SQL example must fail: checking that it does"
broken="$work/broken/src"
mkdir -p "$broken"
cp -r "$REPO/docs/src/." "$broken/"
printf '\n```sql\nSELECT keypool_reserve(%s);\n```\n' "'user-1', 'no such pool', 1, 2, 3" >>"$broken/tour.md"
if (run_pages "$broken") 2>"$work/broken.err"; then
    say "a page with a broken example passed: the runner is broken"
    exit 1
fi
grep -q "tour.md" "$work/broken.err" || { cat "$work/broken.err" >&2; say "the failure does not name the page"; exit 1; }
say "docs examples pass; a broken one fails and names its page"
