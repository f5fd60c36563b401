#!/usr/bin/env bash
# make package: the Debian packages, into target/debian/:
#   postgresql-15-pg-keypool_<version>_amd64.deb  the library, control file and every SQL script
#       (the current install script from `cargo pgrx package`, the frozen install scripts of
#       earlier releases, the upgrade scripts) at the paths pg_config reports; README.Debian
#   keypool-worker_<version>_amd64.deb  (cargo-deb) the binary, keypool-worker.service, the
#       environment file /etc/keypool-worker/env, its --help as documentation
#   postgresql-18-pg-keypool_<version>_amd64.deb  the same for PostgreSQL 18 (built against
#       PostgreSQL 18 built here; for apt.postgresql.org's postgresql-18)
#   postgresql-17-pg-keypool_<version>_amd64.deb  the same for Debian 13's PostgreSQL 17, built in a
#       Debian 13 root (scripts/test-debian13.sh package)
# KEYPOOL_PG=N KEYPOOL_PACKAGE=extension: the extension's package for major N alone.
# Versions come from the crates. Sets up what it needs; a fresh clone is enough.
. "$(dirname "$0")/lib.sh"

CARGO_DEB_VERSION=3.8.0
OUT="$REPO/target/debian"

ensure_setup
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    say "installing cargo-deb $CARGO_DEB_VERSION (once per machine)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
mkdir -p "$OUT"
version="$(crate_version)"
arch="$(dpkg --print-architecture)"
pg_major="$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')"
pkglibdir="$("$PG_CONFIG" --pkglibdir)"
sharedir="$("$PG_CONFIG" --sharedir)"
docdir() { echo "/usr/share/doc/$1"; }

# --- the extension ------------------------------------------------------------------------------
ext_pkg="postgresql-$pg_major-pg-keypool"
say "cargo pgrx package (release)"
stage="$OUT/stage-$ext_pkg"
rm -rf "$stage"
if [[ "$pg_major" == 15 ]]; then
    (cd "$REPO/pg_keypool" && cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$stage" >/dev/null)
else
    (cd "$REPO/pg_keypool" && CARGO_TARGET_DIR="$REPO/target/pg$pg_major" \
        cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$stage" >/dev/null)
fi
# A PostgreSQL built here (18, under /opt) has its own prefix: the package puts the files where
# Debian's and apt.postgresql.org's packages of that major look for them.
debian_lib="/usr/lib/postgresql/$pg_major/lib" debian_share="/usr/share/postgresql/$pg_major"
if [[ "$pkglibdir" != "$debian_lib" ]]; then
    install -d "$stage$debian_lib" "$stage$debian_share"
    mv "$stage$pkglibdir"/* "$stage$debian_lib/"
    mv "$stage$sharedir/extension" "$stage$debian_share/"
    rm -rf "${stage:?}/${pkglibdir#/}" "${stage:?}/${sharedir#/}"
    find "$stage" -depth -type d -empty -delete
    pkglibdir="$debian_lib" sharedir="$debian_share"
fi
# The frozen install scripts of earlier releases and every upgrade script.
for f in "$REPO"/pg_keypool/sql/pg_keypool--*.sql; do
    install -D -m 644 "$f" "$stage$sharedir/extension/$(basename "$f")"
done
for f in "$stage$pkglibdir/pg_keypool.so" "$stage$sharedir/extension/pg_keypool.control" \
    "$stage$sharedir/extension/pg_keypool--$version.sql"; do
    [[ -f "$f" ]] || { echo "cargo pgrx package did not produce $f" >&2; exit 1; }
done
install -d -m 755 "$stage$(docdir "$ext_pkg")"
sed "s/@MAJOR@/$pg_major/g" "$REPO/ops/debian/postgresql-pg-keypool/README.Debian" >"$stage$(docdir "$ext_pkg")/README.Debian"
chmod 644 "$stage$(docdir "$ext_pkg")/README.Debian"
install -D -m 644 "$REPO/README.md" "$stage$(docdir "$ext_pkg")/README.md"
install -D -m 644 "$REPO/ops/debian/copyright" "$stage$(docdir "$ext_pkg")/copyright"
strip --strip-unneeded "$stage$pkglibdir/pg_keypool.so"
find "$stage" -type d -exec chmod 755 {} +
install -d -m 755 "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<EOF
Package: $ext_pkg
Version: $version
Architecture: $arch
Maintainer: pg_keypool maintainers <maintainers@pg-keypool.invalid>
Section: database
Priority: optional
Depends: postgresql-$pg_major, libc6
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Description: governed pools of LLM and API provider keys inside PostgreSQL $pg_major
 pg_keypool turns provider keys into one governed pool: quota scopes and limits, atomic
 reservation (keypool_reserve), fair shares, least-loaded assignment at signup, outcome
 accounting, budgets and stats views, all in SQL. Needs shared_preload_libraries =
 'pg_keypool' (see README.Debian).
EOF
dpkg-deb --root-owner-group -Zxz --build "$stage" "$OUT/${ext_pkg}_${version}_${arch}.deb" >/dev/null
rm -rf "$stage"

# --- the worker ---------------------------------------------------------------------------------
# One package for Debian 12 and 13 (built on 12: it needs only its libc); KEYPOOL_PACKAGE=extension
# builds the extension's alone (the Debian 13 root does).
if [[ "${KEYPOOL_PACKAGE:-all}" == extension ]]; then
    ls -1 "$OUT/${ext_pkg}_${version}_${arch}.deb"
    exit 0
fi
say "cargo deb -p keypool-worker"
(cd "$REPO" && cargo build --release -q -p keypool-worker)
{
    for cmd in "" serve import-env validate mock-provider; do
        echo "\$ keypool-worker $cmd --help"
        # shellcheck disable=SC2086
        "$REPO/target/release/keypool-worker" $cmd --help
        echo
    done
} >"$REPO/target/release/keypool-worker.help.txt"
(cd "$REPO" && cargo deb -p keypool-worker --no-build --output "$OUT/keypool-worker_${version}_${arch}.deb" >/dev/null)

# The other majors' packages (make package).
if [[ "${KEYPOOL_PACKAGE:-all}" == all ]]; then
    KEYPOOL_PG=18 KEYPOOL_PACKAGE=extension "$REPO/scripts/package.sh"
    KEYPOOL_PACKAGE=15-and-worker "$REPO/scripts/test-debian13.sh" package
fi

say "built:"
ls -1 "$OUT"/*_"$version"_"$arch".deb
