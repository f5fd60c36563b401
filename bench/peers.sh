# The peers keypool-worker is measured beside, installed into target/ when missing (sourced by
# bench/vs-litellm.sh and bench/vs-peers.sh, after scripts/lib.sh).
#
# - LiteLLM's proxy (pinned, with its proxy extra) in a private venv: target/vs-litellm/venv.
# - Portkey's open-source gateway (npm @portkey-ai/gateway, pinned by bench/portkey's lockfile,
#   installed with npm ci and no install scripts): target/vs-peers/portkey.
# - wrk, from Debian.

LITELLM_VERSION=1.108.0
LITELLM_HOME="$REPO/target/vs-litellm"
PORTKEY_HOME="$REPO/target/vs-peers/portkey"
PORTKEY_SERVER="$PORTKEY_HOME/node_modules/@portkey-ai/gateway/build/start-server.js"

ensure_wrk() {
    if ! command -v wrk >/dev/null; then
        say "installing wrk"
        apt-get install -y -qq wrk >/dev/null
    fi
}

ensure_litellm() {
    mkdir -p "$LITELLM_HOME"
    if ! "$LITELLM_HOME/venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$LITELLM_VERSION')" 2>/dev/null; then
        say "installing litellm[proxy]==$LITELLM_VERSION into $LITELLM_HOME/venv"
        python3 -m venv "$LITELLM_HOME/venv"
        "$LITELLM_HOME/venv/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION" redis
    fi
}

ensure_portkey() {
    # Installed again whenever the committed lockfile changed.
    if ! cmp -s "$REPO/bench/portkey/package-lock.json" "$PORTKEY_HOME/package-lock.json" || [ ! -f "$PORTKEY_SERVER" ]; then
        say "installing Portkey's gateway ($(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["dependencies"]["@portkey-ai/gateway"])' "$REPO/bench/portkey/package.json")) into $PORTKEY_HOME"
        rm -rf "$PORTKEY_HOME" && mkdir -p "$PORTKEY_HOME"
        cp "$REPO/bench/portkey/package.json" "$REPO/bench/portkey/package-lock.json" "$PORTKEY_HOME/"
        (cd "$PORTKEY_HOME" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
    fi
}
