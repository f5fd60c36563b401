#!/usr/bin/env bash
# make test-packages (the last step of make test): the Debian packages as a user installs them.
#
# Builds them (scripts/package.sh), checks what they hold, installs both with dpkg -i over the
# development build, runs the pg_regress suite against a private cluster that preloads the
# installed library, updates an installation of 0.1.0 with the packaged scripts, checks the unit
# with systemd-analyze verify (PID 1 here is not systemd), starts the worker the way the unit does
# (its user, its ExecStart line, an environment file) and sends a chat request through it to the
# mock provider, then removes both packages with dpkg -r (nothing left but the worker's
# configuration) and purges them. The development build is installed again at the end, whatever
# happened.
. "$(dirname "$0")/lib.sh"

PORT="${KEYPOOL_PACKAGES_PORT:-54361}"
OUT="$REPO/target/debian"

# systemd-analyze (package systemd) checks the unit; adduser is what the worker's postinst calls.
for p in systemd adduser; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then
        say "installing Debian package: $p"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null
    fi
done
KEYPOOL_PACKAGE=15-and-worker "$REPO/scripts/package.sh"
version="$(crate_version)"
arch="$(dpkg --print-architecture)"
EXT=postgresql-15-pg-keypool
EXT_DEB="$OUT/${EXT}_${version}_${arch}.deb"
WORKER_DEB="$OUT/keypool-worker_${version}_${arch}.deb"
pkglibdir="$("$PG_CONFIG" --pkglibdir)"
extdir="$("$PG_CONFIG" --sharedir)/extension"

fail() { echo "test-packages: $*" >&2; exit 1; }
# has DEB PATH: the package holds PATH (the listing is read whole first: grep -q stopping early
# would make the listing's writer fail under pipefail).
has() {
    local listing
    listing="$(dpkg-deb -c "$1" | awk '{print $6}' | sed 's|^\./|/|')"
    grep -qx -- "$2" <<<"$listing" || fail "$(basename "$1") lacks $2"
}

say "what the packages hold"
for f in "$pkglibdir/pg_keypool.so" "$extdir/pg_keypool.control" "$extdir/pg_keypool--$version.sql" \
    "$extdir/pg_keypool--0.1.0.sql" "$extdir/pg_keypool--0.1.0--0.2.0.sql" \
    "$extdir/pg_keypool--0.2.0.sql" "$extdir/pg_keypool--0.2.0--$version.sql" \
    "/usr/share/doc/$EXT/README.Debian"; do
    has "$EXT_DEB" "$f"
done
depends="$(dpkg-deb -f "$EXT_DEB" Depends)"
[[ ", $depends," == *", postgresql-15,"* || ", $depends," == *", postgresql-15 ("* ]] ||
    fail "$EXT does not depend on postgresql-15 (Depends: $depends)"
for f in /usr/bin/keypool-worker /lib/systemd/system/keypool-worker.service /etc/keypool-worker/env \
    /usr/share/doc/keypool-worker/keypool-worker.help.txt; do
    has "$WORKER_DEB" "$f"
done
# Every worker setting the book lists (docs/src/worker.md) is in the environment file, commented.
env_file="$(mktemp -d)/env"
dpkg-deb --fsys-tarfile "$WORKER_DEB" | tar -xO ./etc/keypool-worker/env >"$env_file"
for s in $(sed -n '/^| `--database-url`/,/^$/p' "$REPO/docs/src/worker.md" | grep -o 'KEYPOOL_[A-Z_]*' | sort -u); do
    grep -q "^#$s=" "$env_file" || fail "the environment file does not list $s"
done

pids=()
cleanup() {
    local status=$?
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cluster_stop packages
    for p in keypool-worker "$EXT"; do
        dpkg -s "$p" >/dev/null 2>&1 && dpkg --purge "$p" >/dev/null
    done
    say "installing the development build again"
    install_extension debug
    exit "$status"
}
trap cleanup EXIT

say "dpkg -i"
stop_all_clusters
dpkg -i "$EXT_DEB" "$WORKER_DEB" >/dev/null
cmp -s <(dpkg-deb --fsys-tarfile "$EXT_DEB" | tar -xO ".$pkglibdir/pg_keypool.so") "$pkglibdir/pg_keypool.so" ||
    fail "the installed library is not the package's"
getent passwd keypool-worker >/dev/null || fail "no keypool-worker user"
[[ "$(stat -c '%U:%G %a' /etc/keypool-worker/env)" == "root:keypool-worker 640" ]] ||
    fail "/etc/keypool-worker/env is $(stat -c '%U:%G %a' /etc/keypool-worker/env)"

say "pg_regress against the installed library"
KEYPOOL_REGRESS_PORT="$PORT" "$REPO/scripts/regress.sh"

say "systemd-analyze verify"
unit=/lib/systemd/system/keypool-worker.service
# It exits 0 on unknown keys and unparsable values (they are only warned about): any word from it
# is a failure.
verdict="$(systemd-analyze verify "$unit" 2>&1)" || fail "systemd-analyze verify: $verdict"
[[ -z "$verdict" ]] || fail "systemd-analyze verify: $verdict"
for d in NoNewPrivileges=yes ProtectSystem=strict PrivateTmp=yes ProtectHome=yes RestrictAddressFamilies= \
    User=keypool-worker EnvironmentFile=/etc/keypool-worker/env; do
    grep -q "^$d" "$unit" || fail "the unit lacks $d"
done

say "the worker as the unit starts it"
cluster_start packages "$PORT"
dir="$(cluster_dir packages)"
cluster_psql packages "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS pkg WITH (FORCE)" -c "CREATE DATABASE pkg"
mock_port=$(free_port)
/usr/bin/keypool-worker mock-provider --listen "127.0.0.1:$mock_port" >"$dir/mock.log" 2>&1 &
pids+=($!)
cluster_psql packages "$PORT" -q -d pkg -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE EXTENSION pg_keypool;
SELECT keypool_create_pool('chat');
SELECT keypool_add_key('chat', 'openai', 'sk-packaged-key-0000000000000001', 'gpt-4o-mini', rpm => 100,
                       base_url => 'http://127.0.0.1:$mock_port/v1');
SQL
# The packaged scripts carry an installation of the previous release forward (the data side of
# upgrades is tests/tests/upgrade.rs).
cluster_psql packages "$PORT" -q -d postgres -c "DROP DATABASE IF EXISTS pkgup WITH (FORCE)" -c "CREATE DATABASE pkgup"
upgraded="$(cluster_psql packages "$PORT" -d pkgup -At -v ON_ERROR_STOP=1 \
    -c "CREATE EXTENSION pg_keypool VERSION '0.1.0'" -c "ALTER EXTENSION pg_keypool UPDATE" \
    -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_keypool'" | tail -1)"
[[ "$upgraded" == "$version" ]] || fail "ALTER EXTENSION pg_keypool UPDATE from 0.1.0 gave version '$upgraded'"
worker_port=$(free_port)
token="pkg-token-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# The packaged environment file, with the three settings an operator fills in.
test_env="$dir/worker.env"
{
    cat /etc/keypool-worker/env
    echo "KEYPOOL_DATABASE_URL=host=127.0.0.1 port=$PORT user=postgres dbname=pkg"
    echo "KEYPOOL_LISTEN=127.0.0.1:$worker_port"
    echo "KEYPOOL_API_TOKENS=$token"
} >"$test_env"
chown root:keypool-worker "$test_env" && chmod 640 "$test_env"
exec_start="$(sed -n 's/^ExecStart=//p' "$unit")"
user="$(sed -n 's/^User=//p' "$unit")"
# EnvironmentFile= as systemd reads it: KEY=VALUE lines (the value runs to the end of the line,
# spaces included, surrounding quotes removed), # and ; comments; nothing else in the environment.
env_args=()
while IFS= read -r line; do
    [[ "$line" =~ ^[[:space:]]*([#\;]|$) ]] && continue
    value="${line#*=}"
    [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]] && value="${BASH_REMATCH[1]}"
    env_args+=("${line%%=*}=$value")
done <"$test_env"
# shellcheck disable=SC2086
runuser -u "$user" -- env -i "${env_args[@]}" $exec_start >"$dir/worker.log" 2>&1 &
pids+=($!)
wait_for_url "http://127.0.0.1:$worker_port/healthz" "the packaged worker" "$dir/worker.log" "${pids[-1]}"
answer="$(curl -fsS "http://127.0.0.1:$worker_port/v1/chat/completions" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -H 'X-Keypool-User: u1' \
    -d '{"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}')" ||
    { cat "$dir/worker.log" >&2; fail "no answer through the packaged worker"; }
grep -q '"choices"' <<<"$answer" || fail "unexpected answer: $answer"
worker_pid="$(pgrep -P "${pids[-1]}" -x keypool-worker)" || fail "no keypool-worker process under runuser"
[[ "$(ps -o user= -p "$worker_pid")" == keypool-worker ]] || fail "the worker does not run as keypool-worker"
kill "$worker_pid"
wait "${pids[-1]}" 2>/dev/null || true
cluster_stop packages

say "dpkg -r: nothing left but configuration"
dpkg -r keypool-worker "$EXT" >/dev/null
for f in /usr/bin/keypool-worker "$unit" "$pkglibdir/pg_keypool.so" "$extdir/pg_keypool.control" \
    "$extdir/pg_keypool--$version.sql" "$extdir/pg_keypool--0.1.0.sql"; do
    [[ ! -e "$f" ]] || fail "$f is still there after dpkg -r"
done
[[ -f /etc/keypool-worker/env ]] || fail "dpkg -r removed the worker's configuration"
[[ "$(dpkg-query -W -f '${db:Status-Status}' keypool-worker)" == config-files ]] || fail "keypool-worker is not in config-files state"
[[ "$(dpkg-query -W -f '${db:Status-Status}' "$EXT" 2>/dev/null || echo not-installed)" =~ ^(not-installed|config-files)$ ]] ||
    fail "$EXT is still installed"
dpkg --purge keypool-worker >/dev/null
[[ ! -e /etc/keypool-worker ]] || fail "dpkg --purge left /etc/keypool-worker"
getent passwd keypool-worker >/dev/null && fail "dpkg --purge left the keypool-worker user"
say "packages: all checks passed"
