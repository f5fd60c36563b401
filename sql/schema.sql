-- pg_keypool: internal tables.
--
-- Everything in schema keypool is private to the extension. Applications and operators use the
-- keypool_* functions and views; the functions check the caller's privileges on the pool
-- (keypool.pool_grant) and read and write these tables as the extension's owner, with the search
-- path pinned to pg_catalog, keypool, pg_temp. Rate-window state is not here: it lives in shared
-- memory (see README). Provider secrets are here only sealed (keypool.key.secret_sealed).

CREATE SCHEMA keypool;
REVOKE ALL ON SCHEMA keypool FROM PUBLIC;
COMMENT ON SCHEMA keypool IS 'pg_keypool internals: pools, keys, quota scopes, usage history, events';

-- One row: identifies this installation, so that shared-memory state of a dropped and
-- re-created extension is never mistaken for the new one's.
CREATE TABLE keypool.instance (
    one_row    boolean PRIMARY KEY DEFAULT true CHECK (one_row),
    id         bigint NOT NULL DEFAULT (1 + floor(random() * 9e18))::bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Row ids of the tables pg_dump keeps come from sequences pg_dump keeps too (registered at the
-- end), so that a restored database goes on numbering where the dumped one stopped.

-- A named set of keys serving one function (chat, artifact, image ...), and how its daily
-- capacity is shared among its users.
CREATE SEQUENCE keypool.pool_id_seq;
CREATE TABLE keypool.pool (
    id          bigint PRIMARY KEY DEFAULT nextval('keypool.pool_id_seq'),
    name        text NOT NULL UNIQUE CHECK (name <> ''),
    description text,
    -- A user's daily share never goes below this many requests.
    min_share   integer NOT NULL DEFAULT 0 CHECK (min_share >= 0),
    -- When set, only members active within this many days (today included) share the capacity.
    active_days integer CHECK (active_days BETWEEN 1 AND 90),
    -- Users past their share may use capacity that no other user's share can still claim.
    borrowing   boolean NOT NULL DEFAULT false,
    -- The time zone of users' daily reset; NULL: that of the pool's keys when they agree, else UTC.
    timezone    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Whether a user past their share here goes on down the fallback chain (a share is a promise
    -- per pool: by default it does not).
    fallback_on_quota boolean NOT NULL DEFAULT false,
    -- Spend budget (keypool_set_budget), in millionths of the currency of keypool_prices: for the
    -- pool per period, and for each of its users per period; NULL: none.
    budget_micros          bigint CHECK (budget_micros >= 0),
    budget_period          text CHECK (budget_period IN ('day', 'month')),
    budget_per_user_micros bigint CHECK (budget_per_user_micros >= 0),
    -- What a reservation without a token estimate holds of a budget (keypool_alter_pool).
    default_cost_micros    bigint NOT NULL DEFAULT 0 CHECK (default_cost_micros >= 0),
    -- Whether a user whose own keys are all at their limits falls back to the shared keys.
    owner_fallback         boolean NOT NULL DEFAULT true,
    -- Limits on each user's rolling minute (NULL: none): the most of the pool's requests and
    -- tokens per minute one user may take (with fair shares while several keep asking), and
    -- fixed caps of requests, tokens and reservations open at once.
    minute_share           double precision CHECK (minute_share > 0 AND minute_share <= 1),
    user_rpm               integer CHECK (user_rpm > 0),
    user_tpm               bigint CHECK (user_tpm > 0),
    user_max_concurrent    integer CHECK (user_max_concurrent > 0),
    CHECK ((budget_period IS NULL) = (budget_micros IS NULL AND budget_per_user_micros IS NULL))
);
ALTER SEQUENCE keypool.pool_id_seq OWNED BY keypool.pool.id;

-- A pool's fallback chain (keypool_set_fallbacks): the pools keypool_reserve tries next, in
-- order, when this one refuses. Flat: a fallback's own chain is not followed.
CREATE TABLE keypool.pool_fallback (
    pool_id     bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    position    integer NOT NULL CHECK (position > 0),
    fallback_id bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    PRIMARY KEY (pool_id, position),
    UNIQUE (pool_id, fallback_id),
    CHECK (fallback_id <> pool_id)
);
CREATE INDEX pool_fallback_fallback ON keypool.pool_fallback (fallback_id);

-- A quota scope: a provider account (project, organization) for one model. Limits belong here,
-- not to keys: keys that share an account share its limits. A key added without an account
-- gets a scope of its own (account IS NULL).
CREATE SEQUENCE keypool.scope_id_seq;
CREATE TABLE keypool.scope (
    id              bigint PRIMARY KEY DEFAULT nextval('keypool.scope_id_seq'),
    provider        text NOT NULL,
    account         text,
    model           text,
    rpm             integer CHECK (rpm > 0),
    rpd             integer CHECK (rpd > 0),
    tpm             bigint CHECK (tpm > 0),
    tpd             bigint CHECK (tpd > 0),
    timezone        text NOT NULL DEFAULT 'UTC',
    disabled_reason text,
    disabled_at     timestamptz,
    -- Who disabled it: the provider's answer (billing), or an operator.
    disabled_by     text CHECK (disabled_by IN ('provider', 'operator')),
    created_at      timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE keypool.scope_id_seq OWNED BY keypool.scope.id;
CREATE UNIQUE INDEX scope_account_model ON keypool.scope (provider, account, (coalesce(model, '')))
    WHERE account IS NOT NULL;

-- The master keys of the keyring (pg_keypool.master_key_file) this database sealed secrets
-- with: their fingerprints, so that a missing or different keyring is refused, never replaced.
-- No unique constraint: two transactions sealing a database's first secrets at once each record
-- the key (the same row twice) instead of one waiting for the other.
CREATE TABLE keypool.master_key (
    key_no      integer NOT NULL CHECK (key_no > 0),
    fingerprint bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A provider key. The secret is stored sealed (XChaCha20-Poly1305 under a master key, with the
-- key's id as associated data) and only ever returned in plaintext by keypool_reserve (and, to
-- a pool's administrators, keypool_key_credentials); everything else shows the masked label.
CREATE SEQUENCE keypool.key_id_seq;
CREATE TABLE keypool.key (
    id              bigint PRIMARY KEY DEFAULT nextval('keypool.key_id_seq'),
    pool_id         bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    scope_id        bigint NOT NULL REFERENCES keypool.scope (id),
    provider        text NOT NULL,
    model           text,
    base_url        text NOT NULL,
    label           text NOT NULL,
    -- Stable small number of the key within its pool (1, 2, ...): the "key group" apps store.
    group_no        integer NOT NULL,
    -- Lower is preferred: a key of a worse priority serves only while every better key of the
    -- pool is at its limits, cooling or disabled; new users are assigned to the best ones.
    priority        integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
    -- A user's own key (bring your own key): it serves that user only, first, outside their
    -- share; NULL: a shared key of the pool.
    owner           text CHECK (owner <> ''),
    -- Most reservations the key may have open at once (a self-hosted backend takes only so
    -- many); NULL: no limit.
    max_concurrent  integer CHECK (max_concurrent > 0),
    disabled_reason text,
    disabled_at     timestamptz,
    -- Who disabled it: the provider's answer (401, API_KEY_INVALID ...), or an operator.
    disabled_by     text CHECK (disabled_by IN ('provider', 'operator')),
    -- Checks of a key a provider's answer disabled (recheck.rs): how many said no, and when the
    -- next is due (NULL: the first, a worker's KEYPOOL_RECHECK_AFTER after the disabling).
    rechecks        integer NOT NULL DEFAULT 0,
    recheck_at      timestamptz,
    -- Removed keys keep their history; they take no traffic and no users.
    removed_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The secret, sealed; the master key it is sealed with; its keyed digest (HMAC-SHA256 under
    -- the newest master key), which finds a secret already in the pool.
    secret_sealed   bytea NOT NULL,
    sealed_with     integer NOT NULL,
    secret_hmac     bytea NOT NULL,
    UNIQUE (pool_id, secret_hmac),
    UNIQUE (pool_id, group_no)
);
ALTER SEQUENCE keypool.key_id_seq OWNED BY keypool.key.id;
CREATE INDEX key_scope ON keypool.key (scope_id);

-- A user of a pool: assigned to a key (least loaded at assignment), with a weight for its
-- share of the pool's daily capacity. user_hash identifies the user in shared memory.
CREATE TABLE keypool.member (
    pool_id     bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    user_id     text NOT NULL,
    user_hash   bigint NOT NULL,
    key_id      bigint REFERENCES keypool.key (id),
    weight      numeric NOT NULL DEFAULT 1 CHECK (weight > 0),
    last_active date,
    assigned_at timestamptz NOT NULL DEFAULT now(),
    -- What the member used of their share on day used_on, and that share, as last flushed:
    -- read when the member is cached again (shared memory holds the active members), and
    -- after a crash or a failover.
    used_on     date,
    used        bigint,
    share       bigint,
    PRIMARY KEY (pool_id, user_id)
) WITH (fillfactor = 70);  -- room for HOT updates of last_active, used_on, used and share
CREATE INDEX member_hash ON keypool.member (pool_id, user_hash);
CREATE INDEX member_key ON keypool.member (key_id);

-- Usage history, one row per key per hour: grows with keys and time, not with requests.
CREATE TABLE keypool.usage_hourly (
    key_id            bigint NOT NULL REFERENCES keypool.key (id) ON DELETE CASCADE,
    hour              timestamptz NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    released          bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    success           bigint NOT NULL DEFAULT 0,
    rate_limited      bigint NOT NULL DEFAULT 0,
    daily_quota       bigint NOT NULL DEFAULT 0,
    key_invalid       bigint NOT NULL DEFAULT 0,
    billing           bigint NOT NULL DEFAULT 0,
    server_error      bigint NOT NULL DEFAULT 0,
    caller_error      bigint NOT NULL DEFAULT 0,
    other             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, hour)
);

-- What each pool with a budget spent in its current period (reservations held included), as
-- last flushed: restored after a crash or a failover (budgets.rs).
CREATE TABLE keypool.pool_spend (
    pool_id      bigint PRIMARY KEY REFERENCES keypool.pool (id) ON DELETE CASCADE,
    period_start date NOT NULL,
    spent        bigint NOT NULL
) WITH (fillfactor = 50);

-- What each user (member or not) spent of a pool's per-user budget in the period that began on
-- period_start, as last flushed: read at the user's first reservation of a period that shared
-- memory does not know (budgets.rs).
CREATE TABLE keypool.user_spend (
    pool_id      bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    user_hash    bigint NOT NULL,
    period_start date NOT NULL,
    spent        bigint NOT NULL,
    PRIMARY KEY (pool_id, user_hash)
) WITH (fillfactor = 50);

-- What each scope used of its day, as the primary last recorded it (failover.rs): a promoted
-- standby starts from this plus what the limits allowed since, never from its own stale memory.
-- One row per scope, rewritten only when it changed; the free space keeps updates HOT.
CREATE TABLE keypool.scope_usage (
    scope_id      bigint PRIMARY KEY REFERENCES keypool.scope (id) ON DELETE CASCADE,
    day_start     timestamptz NOT NULL,
    day_end       timestamptz NOT NULL,
    requests      bigint NOT NULL,
    tokens        bigint NOT NULL,
    cooling_until timestamptz
) WITH (fillfactor = 50);

-- When keypool.scope_usage was last read from shared memory (one row).
CREATE TABLE keypool.usage_snapshot (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    saved_at timestamptz NOT NULL
);

-- What changed and why: keys added, disabled, enabled; scopes disabled for billing.
CREATE SEQUENCE keypool.event_id_seq;
CREATE TABLE keypool.event (
    id       bigint PRIMARY KEY DEFAULT nextval('keypool.event_id_seq'),
    at       timestamptz NOT NULL,
    kind     text NOT NULL,
    pool_id  bigint,
    key_id   bigint,
    scope_id bigint,
    reason   text
);
ALTER SEQUENCE keypool.event_id_seq OWNED BY keypool.event.id;
CREATE INDEX event_at ON keypool.event (at);

-- Who may use, read or administer which pool (keypool_grant); pool_id NULL: every pool ('*').
CREATE TABLE keypool.pool_grant (
    pool_id    bigint REFERENCES keypool.pool (id) ON DELETE CASCADE,
    grantee    regrole NOT NULL,
    privilege  text NOT NULL CHECK (privilege IN ('use', 'read', 'admin')),
    granted_by regrole NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (pool_id, grantee, privilege)
);

-- API tokens of keypool-worker's callers (tokens.rs): only each token's SHA-256 is kept. A
-- token may be bound to a user (it always acts as that user) and to pools (it reaches no other;
-- NULL: every pool the worker serves).
CREATE SEQUENCE keypool.api_token_id_seq;
CREATE TABLE keypool.api_token (
    id           bigint PRIMARY KEY DEFAULT nextval('keypool.api_token_id_seq'),
    label        text NOT NULL CHECK (label <> ''),
    user_id      text,
    pool_ids     bigint[],
    token_sha256 bytea NOT NULL UNIQUE,
    created_by   regrole NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    -- Limits on the token's use, across every worker (NULL: none): requests and tokens per
    -- rolling minute, requests per day (UTC), reservations open at once.
    rpm            integer CHECK (rpm > 0),
    tpm            bigint CHECK (tpm > 0),
    rpd            integer CHECK (rpd > 0),
    max_concurrent integer CHECK (max_concurrent > 0)
);
ALTER SEQUENCE keypool.api_token_id_seq OWNED BY keypool.api_token.id;

-- Any change to the configuration makes every backend reload its cache (see config.rs).
CREATE FUNCTION keypool.config_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    PERFORM keypool.note_config_change();
    RETURN NULL;
END
$$;

CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.instance
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.pool
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.scope
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.key
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.pool_fallback
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.pool_grant
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.master_key
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();

-- pg_dump keeps the configuration and history (secrets sealed: a restore needs the keyring).
SELECT pg_catalog.pg_extension_config_dump('keypool.pool_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.scope_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.key_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.event_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.api_token_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.api_token', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.master_key', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.pool_grant', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.pool', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.pool_fallback', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.scope', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.key', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.member', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.usage_hourly', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.scope_usage', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.pool_spend', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.user_spend', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.usage_snapshot', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.event', '');
