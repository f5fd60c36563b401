#!/usr/bin/env bash
# Debian 13 (trixie) with its own PostgreSQL 17: a real Debian 13 root made with debootstrap once
# per machine (/opt/pg_keypool-debian13, about 5 minutes), in which, with this checkout and the
# Rust toolchain mounted in:
#   1. postgresql-17-pg-keypool is built against Debian 13's postgresql-server-dev-17
#      (scripts/package.sh) and installed with apt next to Debian 13's postgresql-17, with the
#      keypool-worker package built on Debian 12;
#   2. a cluster of Debian 13's PostgreSQL 17 that preloads the installed library:
#      CREATE EXTENSION, a pool, a key, a granted reservation;
#   3. the pg_regress suite on PostgreSQL 17 (scripts/regress.sh), and the integration tests of
#      what differs by major (restart, state file, keyring, failover, upgrade), as on 18;
#   4. pg_upgrade from PostgreSQL 15 (Debian 12's own binaries and our Debian 12 package, unpacked
#      into the root) to 17 of a database with pools, sealed secrets, members, a budget, an API
#      token and history: refused with a message naming the keyring until it is copied, then the
#      same secrets and key ids for the same members, today's use kept, reservations go on;
# Not to 18: the PostgreSQL 18 that can be built here (sid's 18.6) does not know the column option
# (pg_attver) that Debian 12's 15.20 and Debian 13's 17.12 write on every column, so its
# pg_upgrade from either fails for any database (docs/src/upgrades.md).
# make test runs it after the other majors. Usage: scripts/test-debian13.sh
#        scripts/test-debian13.sh package    (step 1's package alone: make package)
. "$(dirname "$0")/lib.sh"

ROOT_DIR="${KEYPOOL_DEBIAN13:-/opt/pg_keypool-debian13}"
ROOT="$ROOT_DIR/root"
PACKAGES=postgresql-17,postgresql-server-dev-17,clang,libclang-dev,pkg-config,gcc,make,libc6-dev,ca-certificates,perl,sudo

MODE="${1:-test}"
if [[ "$MODE" != inside-* ]]; then
    if [[ ! -f "$ROOT_DIR/.ready" ]]; then
        command -v debootstrap >/dev/null || {
            say "installing debootstrap"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        }
        say "making a Debian 13 root with its PostgreSQL 17 in $ROOT (debootstrap; once per machine)"
        rm -rf "$ROOT"
        mkdir -p "$ROOT"
        debootstrap --variant=minbase --include="$PACKAGES" trixie "$ROOT" http://deb.debian.org/debian \
            >"$ROOT_DIR/debootstrap.log" 2>&1 || { tail -20 "$ROOT_DIR/debootstrap.log" >&2; exit 1; }
        touch "$ROOT_DIR/.ready"
    fi
    # The worker's package is built on Debian 12 (one package for both), with the extension's
    # for PostgreSQL 15 (the old cluster of the pg_upgrade test).
    version="$(crate_version)"
    arch="$(dpkg --print-architecture)"
    worker_deb="$REPO/target/debian/keypool-worker_${version}_$arch.deb"
    ext15_deb="$REPO/target/debian/postgresql-15-pg-keypool_${version}_$arch.deb"
    KEYPOOL_PACKAGE=15-and-worker "$REPO/scripts/package.sh" >/dev/null
    # PostgreSQL 15 of Debian 12 in the root, beside Debian 13's 17 (for pg_upgrade): its
    # packages and the two libraries Debian 13 no longer has, unpacked, not installed.
    if [[ ! -f "$ROOT_DIR/.pg15" ]]; then
        say "unpacking Debian 12's PostgreSQL 15 into the Debian 13 root (for the pg_upgrade test)"
        debs="$(mktemp -d)"
        (cd "$debs" && apt-get download -qq postgresql-15 libicu72 libldap-2.5-0 >/dev/null)
        for d in "$debs"/*.deb; do dpkg -x "$d" "$ROOT"; done
        rm -rf "$debs"
        touch "$ROOT_DIR/.pg15"
    fi
    dpkg -x "$ext15_deb" "$ROOT"
    mounts=()
    unmount() {
        local m
        for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[$i]}" 2>/dev/null || umount -l "${mounts[$i]}"; done
    }
    trap unmount EXIT
    for m in /proc /dev /dev/pts "$HOME/.cargo" "$HOME/.rustup" "$REPO"; do
        mkdir -p "$ROOT$m"
        mount --bind "$m" "$ROOT$m"
        mounts+=("$ROOT$m")
    done
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    say "Debian 13 root: $(cat "$ROOT/etc/debian_version"), $(chroot "$ROOT" /usr/lib/postgresql/17/bin/postgres --version)"
    chroot "$ROOT" /usr/bin/env -i HOME="$HOME" PATH="$HOME/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        LANG=C.UTF-8 KEYPOOL_PG=17 KEYPOOL_SYSTEM_READY=1 KEYPOOL_CLUSTER_ROOT=/tmp/pg_keypool-debian13 \
        KEYPOOL_WORKER_DEB="$worker_deb" \
        bash "$REPO/scripts/test-debian13.sh" "inside-$MODE"
    exit 0
fi

# --- inside the Debian 13 root ------------------------------------------------------------------
say "in $(. /etc/os-release && echo "$PRETTY_NAME"): building postgresql-17-pg-keypool"
# pgrx here knows this root's PostgreSQL 17 only (a major the host has is not in the root).
rm -f "$HOME/.pgrx/config.toml"
KEYPOOL_PACKAGE=extension "$REPO/scripts/package.sh"
[[ "$MODE" == inside-package ]] && exit 0
version="$(crate_version)"
deb="$REPO/target/debian/postgresql-17-pg-keypool_${version}_$(dpkg --print-architecture).deb"
say "apt install $(basename "$deb") $(basename "$KEYPOOL_WORKER_DEB") (with Debian 13's own dependencies)"
DEBIAN_FRONTEND=noninteractive apt-get install --reinstall -y -qq "$deb" "$KEYPOOL_WORKER_DEB" >/dev/null
dpkg -s postgresql-17-pg-keypool | grep -q '^Status: install ok installed'
for f in "$("$PG_CONFIG" --pkglibdir)/pg_keypool.so" "$("$PG_CONFIG" --sharedir)/extension/pg_keypool.control"; do
    dpkg -S "$f" | grep -q postgresql-17-pg-keypool || { echo "$f is not the package's" >&2; exit 1; }
done
keypool-worker --version

PORT=54317
trap 'cluster_stop deb13' EXIT
cluster_stop deb13
rm -rf "$(cluster_dir deb13)"
cluster_start deb13 "$PORT"
granted="$(cluster_psql deb13 "$PORT" -d postgres -v ON_ERROR_STOP=1 -Atq <<'SQL'
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('chat') \gset
SELECT keypool_add_key('chat', 'openai', 'sk-debian13-key-000000000000000000', 'gpt-4o-mini', rpm => 10) \gset
SELECT granted FROM keypool_reserve('user-1', 'chat', 100);
SQL
)"
server="$(cluster_psql deb13 "$PORT" -d postgres -Atc 'SHOW server_version')"
[[ "$granted" == t ]] || { echo "no reservation granted on PostgreSQL $server: $granted" >&2; exit 1; }
say "PostgreSQL $server (Debian 13): CREATE EXTENSION and a granted reservation with the installed package"
cluster_stop deb13

say "pg_regress on PostgreSQL 17"
"$REPO/scripts/regress.sh"

say "PostgreSQL 17: integration tests (restart, state file, keyring, failover, upgrade) against the installed package"
(cd "$REPO" && CARGO_TARGET_DIR="$REPO/target/debian13" \
    cargo test -q -p keypool-tests --test restart --test keyring --test failover --test upgrade)

# --- pg_upgrade 15 -> 17 ------------------------------------------------------------------------
say "pg_upgrade from PostgreSQL 15 to 17, with pools, sealed secrets, members, a budget, a token and history"
OLD=/usr/lib/postgresql/15/bin NEW=/usr/lib/postgresql/17/bin
up="$CLUSTER_ROOT/upgrade"
rm -rf "$up"
install -d -o postgres -g postgres -m 700 "$up"
trap 'for d in old new; do [[ -f "$up/$d/postmaster.pid" ]] && as_postgres "${BIN[$d]}/pg_ctl" -D "$up/$d" -m fast -w stop >/dev/null 2>&1; done' EXIT
declare -A BIN=([old]="$OLD" [new]="$NEW")
conf() { # conf DIR PORT
    printf "port = %s\nlisten_addresses = ''\nunix_socket_directories = '%s'\nshared_preload_libraries = 'pg_keypool'\n" \
        "$2" "$up" | as_postgres tee -a "$1/postgresql.conf" >/dev/null
}
sql() { as_postgres "$NEW/psql" -X -h "$up" -p "$1" -U postgres -d app -v ON_ERROR_STOP=1 -Atq "${@:2}"; }
for d in old new; do
    as_postgres "${BIN[$d]}/initdb" -D "$up/$d" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
done
conf "$up/old" 54315
conf "$up/new" 54316
as_postgres "$OLD/pg_ctl" -D "$up/old" -l "$up/old.log" -w start >/dev/null
as_postgres "$NEW/psql" -X -h "$up" -p 54315 -U postgres -d postgres -qc "CREATE DATABASE app"
sql 54315 <<'SQL' >/dev/null
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('chat', min_share => 5);
-- Daily limits only: a minute limit is held full for a minute after an upgrade this quick.
SELECT keypool_add_key('chat', 'openai', 'sk-upgrade-key-' || i || '-000000000000000000', 'gpt-4o-mini',
                       rpd => 100000) FROM generate_series(1, 4) i;
CREATE TABLE users (id text PRIMARY KEY, key_group int);
INSERT INTO users SELECT 'user-' || i FROM generate_series(1, 40) i;
SELECT keypool_backfill('users', 'id', 'chat', 'key_group');
SELECT keypool_set_price('openai', 'gpt-4o-mini', 0.15, 0.60);
SELECT keypool_set_budget('chat', 100.00, 'month', per_user => 5.00);
SELECT keypool_create_api_token('upgrade test', 'user-1', ARRAY['chat']);
SQL
# Each member's reservation before: key id, secret and group number (40 requests today).
before="$(sql 54315 <<'SQL'
SELECT string_agg(u.id || ' ' || r.key_id || ' ' || r.secret || ' ' || u.key_group, E'\n' ORDER BY u.id)
  FROM users u, LATERAL keypool_reserve(u.id, 'chat', 10) r;
SQL
)"
sql 54315 -c "SELECT keypool_flush()" >/dev/null
used_before="$(sql 54315 -c "SELECT sum(requests_today) FROM keypool_scopes")"
tokens_before="$(sql 54315 -c "SELECT count(*) FROM keypool_api_tokens")"
as_postgres "$OLD/pg_ctl" -D "$up/old" -m fast -w stop >/dev/null
(cd "$up" && as_postgres "$NEW/pg_upgrade" -b "$OLD" -B "$NEW" -d "$up/old" -D "$up/new" \
    -p 54315 -P 54316 -s "$up" >"$up/pg_upgrade.log" 2>&1) || { tail -30 "$up/pg_upgrade.log" >&2; exit 1; }
as_postgres "$NEW/pg_ctl" -D "$up/new" -l "$up/new.log" -w start >/dev/null
# Without the keyring: refused, naming the file to copy.
if err="$(sql 54316 -c "SELECT secret FROM keypool_reserve('user-1', 'chat', 10)" 2>&1)"; then
    echo "a secret opened without the keyring: $err" >&2; exit 1
fi
grep -q "pg_keypool.keyring\" does not exist" <<<"$err" || { echo "unexpected refusal: $err" >&2; exit 1; }
say "without the keyring: $(head -1 <<<"$err")"
install -m 600 -o postgres -g postgres "$up/old/pg_keypool.keyring" "$up/new/pg_keypool.keyring"
after="$(sql 54316 <<'SQL'
SELECT string_agg(u.id || ' ' || r.key_id || ' ' || r.secret || ' ' || u.key_group, E'\n' ORDER BY u.id)
  FROM users u, LATERAL keypool_reserve(u.id, 'chat', 10) r;
SQL
)"
[[ "$before" == "$after" ]] || { diff <(echo "$before") <(echo "$after") >&2; echo "members' keys or secrets changed" >&2; exit 1; }
used_after="$(sql 54316 -c "SELECT sum(requests_today) FROM keypool_scopes")"
(( used_after >= used_before + 40 )) || { echo "today's use forgotten: $used_before before, $used_after after 40 more" >&2; exit 1; }
[[ "$(sql 54316 -c "SELECT count(*) FROM keypool_api_tokens")" == "$tokens_before" ]] ||
    { echo "API tokens lost in the upgrade" >&2; exit 1; }
[[ "$(sql 54316 -c "SELECT count(*) FROM keypool_members WHERE pool = 'chat'")" == 40 ]] ||
    { echo "members lost in the upgrade" >&2; exit 1; }
say "after pg_upgrade 15 -> 17: 40 members reserve the same key ids and secrets, today's use $used_before -> $used_after (40 more)"

say "Debian 13 with PostgreSQL 17: the package installs and works, pg_regress and the integration tests pass, pg_upgrade 15 -> 17 keeps everything"
