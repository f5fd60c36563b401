# Shared shell functions for pg_keypool's demo, tests and benchmarks.
# Source it: `. scripts/lib.sh`. Every step skips what is already done.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The PostgreSQL majors pg_keypool supports; the first is the one the whole suite runs on.
PG_MAJORS=(15 18)
# The major a script works with (KEYPOOL_PG): 15 from Debian 12's packages; 18 built from
# Debian's source package (sid's) into PG_BUILD_ROOT, by ensure_postgres; 17 is Debian 13's own,
# in a Debian 13 root (scripts/test-debian13.sh), where a script runs with KEYPOOL_SYSTEM_READY.
PG_MAJOR="${KEYPOOL_PG:-15}"
PG_BUILD_ROOT="${KEYPOOL_PG_BUILD_ROOT:-/opt/pg_keypool-postgresql}"
pg_bin_of() {
    if [[ "$1" == 15 || -x "/usr/lib/postgresql/$1/bin/pg_config" ]]; then
        echo "/usr/lib/postgresql/$1/bin"
    else
        echo "$PG_BUILD_ROOT/$1/bin"
    fi
}
PG_BIN="$(pg_bin_of "$PG_MAJOR")"
PG_CONFIG="$PG_BIN/pg_config"
export KEYPOOL_PG_BIN="$PG_BIN"
PGRX_VERSION=0.18.0
# Private clusters live outside the checkout so that the postgres user can reach them wherever
# the checkout is; one directory per checkout (and per major other than 15).
CLUSTER_ROOT="${KEYPOOL_CLUSTER_ROOT:-/tmp/pg_keypool-$(printf '%s' "$REPO" | md5sum | cut -c1-8)}"
if [[ "$PG_MAJOR" != 15 && "$CLUSTER_ROOT" != *-pg"$PG_MAJOR" ]]; then
    CLUSTER_ROOT="$CLUSTER_ROOT-pg$PG_MAJOR"
fi
export KEYPOOL_CLUSTER_ROOT="$CLUSTER_ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# --- machine set-up ---------------------------------------------------------------------------

ensure_packages() {
    local missing=()
    for p in postgresql-15 postgresql-server-dev-15 postgresql-client-15 libclang-dev clang pkg-config sudo python3-venv openssl; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Headless Chromium, for the test that drives /dashboard in a real browser.
ensure_browser() {
    if ! dpkg -s chromium >/dev/null 2>&1; then
        say "installing Debian package: chromium (for the dashboard test)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
}

ensure_cargo_pgrx() {
    if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION"; then
        say "installing cargo-pgrx $PGRX_VERSION (about 6 minutes, once per machine)"
        cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
    fi
    # pgrx knows every major built here (cargo pgrx init writes only the ones it is given).
    local m args=() missing=0 majors=("${PG_MAJORS[@]}")
    [[ " ${majors[*]} " == *" $PG_MAJOR "* ]] || majors+=("$PG_MAJOR")
    for m in "${majors[@]}"; do
        [[ -x "$(pg_bin_of "$m")/pg_config" ]] || continue
        args+=(--pg"$m" "$(pg_bin_of "$m")/pg_config")
        grep -q "^pg$m = " "$HOME/.pgrx/config.toml" 2>/dev/null || missing=1
    done
    if ((missing)); then
        say "cargo pgrx init ${args[*]}"
        cargo pgrx init "${args[@]}" >/dev/null
    fi
}

# ensure_postgres MAJOR: PostgreSQL MAJOR's server, client and server headers. 15 is Debian 12's
# own (ensure_packages); 18 is built once per machine from Debian's source package (postgresql-18
# of sid, with Debian's patches) into PG_BUILD_ROOT/18. (trixie's postgresql-17 source package
# cannot be fetched here, only its binary packages: 17 is for a Debian 13 root, not built here.)
ensure_postgres() {
    local major="$1" prefix="$PG_BUILD_ROOT/$1" suite
    [[ "$major" == 15 || -f "$prefix/.built" ]] && return 0
    case "$major" in
        18) suite=sid ;;
        *) echo "PostgreSQL $major cannot be built on this machine (15 is Debian 12's, 18 is built)" >&2; return 1 ;;
    esac
    say "building PostgreSQL $major from Debian's source package (postgresql-$major of $suite; about 10 minutes, once per machine)"
    local sources=/etc/apt/sources.list.d/pg_keypool-sources.sources
    if ! grep -q "$suite" "$sources" 2>/dev/null; then
        printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$suite" >"$sources"
        apt-get update -qq
    fi
    local p missing=()
    for p in dpkg-dev build-essential bison flex libicu-dev zlib1g-dev libreadline-dev libssl-dev perl; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if ((${#missing[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    local work src
    work="$(mktemp -d)"
    (cd "$work" && apt-get source -qq "postgresql-$major/$suite" >/dev/null 2>&1)
    src="$(find "$work" -maxdepth 1 -type d -name "postgresql-$major-*" | head -1)"
    if [[ -z "$src" ]]; then
        echo "could not fetch Debian's source package postgresql-$major/$suite" >&2
        return 1
    fi
    # Built where it runs (its programs find its libpq there); marked when complete, so that a
    # build broken off is started again next time.
    rm -rf "$prefix"
    (
        cd "$src"
        ./configure -q --prefix="$prefix" --with-icu --with-openssl --with-readline >"$work/configure.log" 2>&1
        make -s -j"$(nproc)" >"$work/make.log" 2>&1
        make -s install >>"$work/make.log" 2>&1
    ) || { tail -30 "$work"/*.log >&2; return 1; }
    rm -rf "$work"
    touch "$prefix/.built"
}

# A virtualenv with the official OpenAI client, for the test that drives the worker with it.
PYTHON_VENV="$REPO/target/python-venv"
ensure_python_client() {
    local req="$REPO/worker/tests/python/requirements.txt"
    if [[ ! -x "$PYTHON_VENV/bin/python" ]]; then
        say "creating a Python virtualenv for the OpenAI client test"
        /usr/bin/python3 -m venv "$PYTHON_VENV"
    fi
    if ! cmp -s "$req" "$PYTHON_VENV/requirements.installed"; then
        say "installing $(tr '\n' ' ' <"$req")into $PYTHON_VENV"
        "$PYTHON_VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
        cp "$req" "$PYTHON_VENV/requirements.installed"
    fi
    export KEYPOOL_PYTHON="$PYTHON_VENV/bin/python"
}

ensure_setup() {
    # In the Debian 13 root its packages were installed when it was made.
    if [[ -z "${KEYPOOL_SYSTEM_READY:-}" ]]; then
        ensure_packages
        ensure_postgres "$PG_MAJOR"
    fi
    ensure_cargo_pgrx
    install -d -m 755 "$CLUSTER_ROOT"
}

# --- building and installing the extension ------------------------------------------------------

# Installs the library and SQL into the system PostgreSQL directories. A running cluster that
# preloads the library crashes when its file is overwritten, so ours are stopped first.
install_extension() {
    local profile="${1:-release}"
    stop_all_clusters
    say "building and installing pg_keypool ($profile)"
    local args=(--pg-config "$PG_CONFIG")
    [[ "$profile" == release ]] && args+=(--release)
    # Each major other than 15 builds in its own target directory (pgrx's bindings differ).
    if [[ "$PG_MAJOR" == 15 ]]; then
        (cd "$REPO/pg_keypool" && cargo pgrx install "${args[@]}" >/dev/null)
    else
        (cd "$REPO/pg_keypool" && CARGO_TARGET_DIR="$REPO/target/pg$PG_MAJOR" cargo pgrx install "${args[@]}" >/dev/null)
    fi
    # cargo pgrx installs the current install script and the upgrade scripts; the frozen install
    # scripts of earlier releases are for CREATE EXTENSION ... VERSION (the upgrade tests).
    local f
    for f in "$REPO"/pg_keypool/sql/pg_keypool--*.sql; do
        [[ "$(basename "$f")" == *--*--* ]] && continue
        install -m 644 "$f" "$("$PG_CONFIG" --sharedir)/extension/"
    done
}

# --- private clusters ---------------------------------------------------------------------------

cluster_dir() { echo "$CLUSTER_ROOT/$1"; }

as_postgres() { runuser -u postgres -- "$@"; }

# cluster_start NAME PORT [setting=value ...]
cluster_start() {
    local name="$1" port="$2"
    shift 2
    local dir
    dir="$(cluster_dir "$name")"
    install -d -o postgres -g postgres -m 700 "$dir"
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    fi
    install -d -o postgres -g postgres -m 700 "$dir/sock"
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir/sock'"
        echo "shared_preload_libraries = 'pg_keypool'"
        echo "max_connections = 200"
        echo "logging_collector = off"
        for setting in "$@"; do echo "$setting"; done
    } | as_postgres tee "$dir/data/postgresql.auto.conf" >/dev/null
    if ! as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start >/dev/null
    fi
}

cluster_stop() {
    local dir
    dir="$(cluster_dir "$1")"
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    fi
}

stop_all_clusters() {
    [[ -d "$CLUSTER_ROOT" ]] || return 0
    local d
    for d in "$CLUSTER_ROOT"/*/data "$CLUSTER_ROOT"/*/*/data "$CLUSTER_ROOT"/pgrx-test; do
        [[ -f "$d/postmaster.pid" ]] && as_postgres "$PG_BIN/pg_ctl" -D "$d" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    done
    return 0
}

# cluster_psql NAME PORT [psql args...]
cluster_psql() {
    local name="$1" port="$2"
    shift 2
    as_postgres psql -X -h "$(cluster_dir "$name")/sock" -p "$port" -U postgres "$@"
}

# --- local servers and the crates ---------------------------------------------------------------

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for_url URL WHAT LOG [PID]: until URL answers 2xx, bounded at 120 s; fails with the end of
# LOG when it does not, or at once when the process PID has exited.
wait_for_url() {
    local _
    for _ in $(seq 1200); do
        curl -fs -o /dev/null "$1" 2>/dev/null && return 0
        if [[ -n "${4:-}" ]] && ! kill -0 "$4" 2>/dev/null; then break; fi
        sleep 0.1
    done
    say "$2 did not start:"
    tail -20 "$3" >&2
    exit 1
}

# The version of a crate of the workspace (default: pg_keypool).
crate_version() {
    (cd "$REPO" && cargo metadata --no-deps --format-version 1) |
        python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == sys.argv[1]))' "${1:-pg_keypool}"
}
