#!/usr/bin/env bash
# Debian 13 (trixie) with its own PostgreSQL 17: a real Debian 13 root made with debootstrap once
# per machine (/opt/pg_keypool-debian13, about 5 minutes), in which, with this checkout and the
# Rust toolchain mounted in:
#   1. postgresql-17-pg-keypool is built against Debian 13's postgresql-server-dev-17
#      (scripts/package.sh) and installed with apt next to Debian 13's postgresql-17, with the
#      keypool-worker package built on Debian 12;
#   2. a cluster of Debian 13's PostgreSQL 17 that preloads the installed library:
#      CREATE EXTENSION, a pool, a key, a granted reservation;
#   3. the pg_regress suite on PostgreSQL 17 (scripts/regress.sh).
# make test runs it after the other majors. Usage: scripts/test-debian13.sh
. "$(dirname "$0")/lib.sh"

ROOT_DIR="${KEYPOOL_DEBIAN13:-/opt/pg_keypool-debian13}"
ROOT="$ROOT_DIR/root"
PACKAGES=postgresql-17,postgresql-server-dev-17,clang,libclang-dev,pkg-config,gcc,make,libc6-dev,ca-certificates,perl,sudo

if [[ "${1:-}" != inside ]]; then
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
    # The worker's package is built on Debian 12 (one package for both).
    version="$(crate_version)"
    worker_deb="$REPO/target/debian/keypool-worker_${version}_$(dpkg --print-architecture).deb"
    [[ -f "$worker_deb" ]] || "$REPO/scripts/package.sh"
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
    say "Debian 13 root: $(cat "$ROOT/etc/debian_version"), $("$ROOT/usr/lib/postgresql/17/bin/postgres" --version 2>/dev/null || chroot "$ROOT" /usr/lib/postgresql/17/bin/postgres --version)"
    chroot "$ROOT" /usr/bin/env -i HOME="$HOME" PATH="$HOME/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        LANG=C.UTF-8 KEYPOOL_PG=17 KEYPOOL_SYSTEM_READY=1 KEYPOOL_CLUSTER_ROOT=/tmp/pg_keypool-debian13 \
        KEYPOOL_WORKER_DEB="$worker_deb" \
        bash "$REPO/scripts/test-debian13.sh" inside
    exit 0
fi

# --- inside the Debian 13 root ------------------------------------------------------------------
say "in $(. /etc/os-release && echo "$PRETTY_NAME"): building postgresql-17-pg-keypool"
KEYPOOL_PACKAGE=extension "$REPO/scripts/package.sh"
version="$(crate_version)"
deb="$REPO/target/debian/postgresql-17-pg-keypool_${version}_$(dpkg --print-architecture).deb"
say "apt install $(basename "$deb") $(basename "$KEYPOOL_WORKER_DEB") (with Debian 13's own dependencies)"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" "$KEYPOOL_WORKER_DEB" >/dev/null
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
say "Debian 13 with PostgreSQL 17: the package installs and works, pg_regress passes"
