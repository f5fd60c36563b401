#!/usr/bin/env bash
# make docs: builds the book (docs/, mdBook) into target/docs/. Installs mdBook once per machine
# (from crates.io, pinned, into /opt/pg_keypool-tools/mdbook). Its examples are run by
# scripts/test-docs.sh (make test).
. "$(dirname "$0")/lib.sh"

MDBOOK_VERSION=0.4.52
MDBOOK_ROOT=/opt/pg_keypool-tools/mdbook
if ! "$MDBOOK_ROOT/bin/mdbook" --version 2>/dev/null | grep -q "v$MDBOOK_VERSION"; then
    say "installing mdBook $MDBOOK_VERSION (about 3 minutes, once per machine)"
    cargo install mdbook --version "$MDBOOK_VERSION" --locked --root "$MDBOOK_ROOT" --quiet
fi
say "building the book into target/docs/"
"$MDBOOK_ROOT/bin/mdbook" build "$REPO/docs"
# Every page of the summary must exist and every link between pages must resolve.
python3 - "$REPO/docs/src" <<'PY'
import os, re, sys
src = sys.argv[1]
bad = []
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith(".md"):
            continue
        path = os.path.join(root, f)
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            if not os.path.exists(os.path.normpath(os.path.join(root, target))):
                bad.append(f"{os.path.relpath(path, src)}: link to {target} leads nowhere")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
PY
say "the book is in target/docs/index.html"
