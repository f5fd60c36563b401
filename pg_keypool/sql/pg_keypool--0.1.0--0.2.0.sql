-- pg_keypool 0.1.0 -> 0.2.0: trust boundaries (issue 11). Frozen once released: never edit.
--
-- - every statement run with the owner's rights has its search path pinned; every plpgsql
--   function carries SET search_path;
-- - privileges per pool (keypool_grant / keypool_revoke, keypool_grants): use, read, admin;
-- - reservations and queue requests have owners; heartbeats belong to a role;
-- - provider secrets sealed at rest under a keyring (pg_keypool.master_key_file), plaintext and
--   plain SHA-256 columns dropped; labels show the provider prefix and at most 4 characters;
-- - views show each role only the pools it may read;
-- - NOTIFY keypool_events carries the event id only;
-- - API tokens for keypool-worker's callers (issue 12), stored as SHA-256 only;
-- - a replicated record of each scope's use, for failover without over-grant (issue 13);
-- - fallback chains across pools, key priorities, keyless keys, spend budgets (issue 14);
-- - rotating a key's secret in place (issue 15).
--
-- After the update the old plaintext still lies in dead tuples of keypool.key and in WAL until
-- they are recycled: run VACUUM FULL keypool.key and CHECKPOINT (README, "Secrets at rest").

-- Row ids from sequences pg_dump keeps: identity columns lost their position in a restore.
DO $$
DECLARE
    t text;
    last bigint;
    called boolean;
BEGIN
    FOREACH t IN ARRAY ARRAY['pool', 'scope', 'key', 'event'] LOOP
        EXECUTE format('SELECT last_value, is_called FROM keypool.%I', t || '_id_seq') INTO last, called;
        EXECUTE format('ALTER TABLE keypool.%I ALTER COLUMN id DROP IDENTITY', t);
        EXECUTE format('CREATE SEQUENCE keypool.%I OWNED BY keypool.%I.id', t || '_id_seq', t);
        PERFORM pg_catalog.setval(format('keypool.%I', t || '_id_seq')::regclass, last, called);
        EXECUTE format('ALTER TABLE keypool.%I ALTER COLUMN id SET DEFAULT nextval(%L::regclass)', t,
                       'keypool.' || t || '_id_seq');
        PERFORM pg_catalog.pg_extension_config_dump(format('keypool.%I', t || '_id_seq')::regclass, '');
    END LOOP;
END
$$;

-- Master keys and grants.
CREATE TABLE keypool.master_key (
    key_no      integer NOT NULL CHECK (key_no > 0),
    fingerprint bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE keypool.pool_grant (
    pool_id    bigint REFERENCES keypool.pool (id) ON DELETE CASCADE,
    grantee    regrole NOT NULL,
    privilege  text NOT NULL CHECK (privilege IN ('use', 'read', 'admin')),
    granted_by regrole NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (pool_id, grantee, privilege)
);

CREATE TABLE keypool.pool_fallback (
    pool_id     bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    position    integer NOT NULL CHECK (position > 0),
    fallback_id bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    PRIMARY KEY (pool_id, position),
    UNIQUE (pool_id, fallback_id),
    CHECK (fallback_id <> pool_id)
);
CREATE INDEX pool_fallback_fallback ON keypool.pool_fallback (fallback_id);
CREATE TABLE keypool.pool_spend (
    pool_id      bigint PRIMARY KEY REFERENCES keypool.pool (id) ON DELETE CASCADE,
    period_start date NOT NULL,
    spent        bigint NOT NULL
) WITH (fillfactor = 50);
SELECT pg_catalog.pg_extension_config_dump('keypool.pool_spend', '');
CREATE TABLE keypool.user_spend (
    pool_id      bigint NOT NULL REFERENCES keypool.pool (id) ON DELETE CASCADE,
    user_hash    bigint NOT NULL,
    period_start date NOT NULL,
    spent        bigint NOT NULL,
    PRIMARY KEY (pool_id, user_hash)
) WITH (fillfactor = 50);
SELECT pg_catalog.pg_extension_config_dump('keypool.user_spend', '');
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.pool_fallback
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
SELECT pg_catalog.pg_extension_config_dump('keypool.pool_fallback', '');
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

-- The replicated record of scopes' and members' use (issue 13: failover without over-grant).
ALTER TABLE keypool.member ADD COLUMN used_on date, ADD COLUMN used bigint, ADD COLUMN share bigint;
-- Room for HOT updates in pages written from now on (VACUUM FULL keypool.member makes room in all).
ALTER TABLE keypool.member SET (fillfactor = 70);
CREATE TABLE keypool.scope_usage (
    scope_id      bigint PRIMARY KEY REFERENCES keypool.scope (id) ON DELETE CASCADE,
    day_start     timestamptz NOT NULL,
    day_end       timestamptz NOT NULL,
    requests      bigint NOT NULL,
    tokens        bigint NOT NULL,
    cooling_until timestamptz
) WITH (fillfactor = 50);
CREATE TABLE keypool.usage_snapshot (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    saved_at timestamptz NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('keypool.scope_usage', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.usage_snapshot', '');

CREATE OR REPLACE FUNCTION keypool.config_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    PERFORM keypool.note_config_change();
    RETURN NULL;
END
$$;
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.pool_grant
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.master_key
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
SELECT pg_catalog.pg_extension_config_dump('keypool.api_token_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.api_token', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.master_key', '');
SELECT pg_catalog.pg_extension_config_dump('keypool.pool_grant', '');

-- Secrets: sealed under the keyring (created now if the cluster has none), new labels, keyed
-- digests; then the plaintext and its plain hash go.
ALTER TABLE keypool.key
    ADD COLUMN secret_sealed bytea,
    ADD COLUMN sealed_with integer,
    ADD COLUMN secret_hmac bytea;
CREATE FUNCTION keypool.seal_plaintext_secrets() RETURNS bigint
LANGUAGE c AS 'MODULE_PATHNAME', 'keypool_seal_plaintext_secrets_wrapper';
SELECT keypool.seal_plaintext_secrets();
DROP FUNCTION keypool.seal_plaintext_secrets();
ALTER TABLE keypool.key
    DROP COLUMN secret,
    DROP COLUMN secret_sha256,
    ALTER COLUMN secret_sealed SET NOT NULL,
    ALTER COLUMN sealed_with SET NOT NULL,
    ALTER COLUMN secret_hmac SET NOT NULL,
    ADD UNIQUE (pool_id, secret_hmac);

-- Owners of queue requests and worker heartbeats: what exists now belongs to the extension's
-- owner (its administrators see it).
ALTER TABLE keypool.request ADD COLUMN submitted_by regrole, ADD COLUMN claimed_role regrole;
UPDATE keypool.request
   SET submitted_by = (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_keypool')::regrole,
       claimed_role = CASE WHEN claimed_by IS NOT NULL
                           THEN (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_keypool')::regrole
                      END;
ALTER TABLE keypool.request ALTER COLUMN submitted_by SET NOT NULL;
CREATE INDEX request_finished ON keypool.request (finished_at) WHERE status IN ('done', 'failed');
ALTER TABLE keypool.worker ADD COLUMN role regrole;
UPDATE keypool.worker SET role = (SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_keypool')::regrole;
ALTER TABLE keypool.worker ALTER COLUMN role SET NOT NULL;
ALTER TABLE keypool.alert ADD COLUMN pool_id bigint;

-- Key priorities and fallback chains (issue 14).
ALTER TABLE keypool.key ADD COLUMN priority integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
    ADD COLUMN owner text CHECK (owner <> '');
-- Limits on each user's minute (issue 28).
ALTER TABLE keypool.pool ADD COLUMN minute_share double precision CHECK (minute_share > 0 AND minute_share <= 1),
    ADD COLUMN user_rpm integer CHECK (user_rpm > 0),
    ADD COLUMN user_tpm bigint CHECK (user_tpm > 0),
    ADD COLUMN user_max_concurrent integer CHECK (user_max_concurrent > 0);
-- Keys a provider disabled are checked again (issue 28).
ALTER TABLE keypool.key ADD COLUMN rechecks integer NOT NULL DEFAULT 0, ADD COLUMN recheck_at timestamptz;
-- Most reservations a key may have open at once (issue 28).
ALTER TABLE keypool.key ADD COLUMN max_concurrent integer CHECK (max_concurrent > 0);
ALTER TABLE keypool.pool ADD COLUMN fallback_on_quota boolean NOT NULL DEFAULT false,
    ADD COLUMN budget_micros bigint CHECK (budget_micros >= 0),
    ADD COLUMN budget_period text CHECK (budget_period IN ('day', 'month')),
    ADD COLUMN budget_per_user_micros bigint CHECK (budget_per_user_micros >= 0),
    ADD COLUMN default_cost_micros bigint NOT NULL DEFAULT 0 CHECK (default_cost_micros >= 0),
    ADD COLUMN owner_fallback boolean NOT NULL DEFAULT true,
    ADD CHECK ((budget_period IS NULL) = (budget_micros IS NULL AND budget_per_user_micros IS NULL));

-- Functions of the library (new, or replacing the SQL ones of 0.1.0 with the same signatures).
CREATE FUNCTION keypool_grant(pool text, grantee regrole, privilege text DEFAULT 'use') RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'keypool_grant_wrapper';
CREATE FUNCTION keypool_revoke(pool text, grantee regrole, privilege text DEFAULT 'use') RETURNS void
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'keypool_revoke_wrapper';
CREATE  FUNCTION "keypool_rotate_master_key"() RETURNS INT /* i32 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_rotate_master_key_wrapper';
CREATE  FUNCTION keypool."allowed"(
	"pool_id" bigint, /* Option < i64 > */
	"privilege" TEXT /* Option < & str > */
) RETURNS bool /* bool */
STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'allowed_wrapper';
CREATE  FUNCTION keypool."scope_readable"(
	"scope_id" bigint /* Option < i64 > */
) RETURNS bool /* bool */
STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'scope_readable_wrapper';
CREATE  FUNCTION keypool."acts_for"(
	"role" oid /* Option < pg_sys :: Oid > */
) RETURNS bool /* bool */
STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'acts_for_wrapper';
CREATE  FUNCTION keypool."member_memory"() RETURNS TABLE (
	"entries" bigint,  /* i64 */
	"members" bigint,  /* i64 */
	"guests" bigint,  /* i64 */
	"free" bigint,  /* i64 */
	"full_stripes" bigint,  /* i64 */
	"guest_entries_taken_over" bigint,  /* i64 */
	"guest_requests_shared" bigint,  /* i64 */
	"bytes" bigint,  /* i64 */
	"hits" bigint,  /* i64 */
	"loads" bigint,  /* i64 */
	"evictions" bigint,  /* i64 */
	"members_uncached" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'member_memory_wrapper';
CREATE  FUNCTION "keypool_alter_key"(
	"key_id" bigint, /* Option < i64 > */
	"priority" INT DEFAULT NULL, /* Option < i32 > */
	"max_concurrent" INT DEFAULT NULL /* Option < i32 > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_alter_key_wrapper';
CREATE  FUNCTION "keypool_set_fallbacks"(
	"pool" TEXT, /* Option < & str > */
	"fallbacks" TEXT[], /* :: std :: option :: Option < Vec < Option < String > > > */
	"on_quota_exceeded" bool DEFAULT false /* Option < bool > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_set_fallbacks_wrapper';
CREATE  FUNCTION keypool."scope_provider_state"() RETURNS TABLE (
	"scope_id" bigint,  /* i64 */
	"requests_left" bigint,  /* Option < i64 > */
	"tokens_left" bigint,  /* Option < i64 > */
	"held_until" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'scope_provider_state_wrapper';
ALTER FUNCTION keypool.scope_provider_state() ROWS 10;
CREATE  FUNCTION keypool."key_load"() RETURNS TABLE (
	"key_id" bigint,  /* i64 */
	"open_reservations" INT  /* i32 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_load_wrapper';
ALTER FUNCTION keypool.key_load() ROWS 10;
CREATE  FUNCTION keypool."routing_state"() RETURNS TABLE (
	"pool_id" bigint,  /* i64 */
	"fell_through_today" bigint,  /* i64 */
	"spent_micros" bigint,  /* Option < i64 > */
	"budget_resets_at" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'routing_state_wrapper';
CREATE  FUNCTION "keypool_set_budget"(
	"pool" TEXT, /* Option < & str > */
	"amount" NUMERIC, /* Option < pgrx :: AnyNumeric > */
	"period" TEXT, /* Option < & str > */
	"per_user" NUMERIC DEFAULT NULL /* Option < pgrx :: AnyNumeric > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_set_budget_wrapper';
CREATE  FUNCTION "keypool_rotate_secret"(
	"key_id" bigint, /* Option < i64 > */
	"new_secret" TEXT /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_rotate_secret_wrapper';
CREATE  FUNCTION "keypool_create_api_token"(
	"label" TEXT, /* Option < & str > */
	"user_id" TEXT DEFAULT NULL, /* Option < & str > */
	"pools" TEXT[] DEFAULT NULL, /* :: std :: option :: Option < Vec < Option < String > > > */
	"expires_at" timestamp with time zone DEFAULT NULL, /* Option < TimestampWithTimeZone > */
	"rpm" INT DEFAULT NULL, /* Option < i32 > */
	"tpm" bigint DEFAULT NULL, /* Option < i64 > */
	"rpd" INT DEFAULT NULL, /* Option < i32 > */
	"max_concurrent" INT DEFAULT NULL /* Option < i32 > */
) RETURNS TEXT /* String */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_create_api_token_wrapper';
CREATE  FUNCTION "keypool_alter_api_token"(
	"id" bigint, /* Option < i64 > */
	"rpm" INT DEFAULT NULL, /* Option < i32 > */
	"tpm" bigint DEFAULT NULL, /* Option < i64 > */
	"rpd" INT DEFAULT NULL, /* Option < i32 > */
	"max_concurrent" INT DEFAULT NULL /* Option < i32 > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_alter_api_token_wrapper';
CREATE  FUNCTION "keypool_recheck_due"(
	"after" interval, /* Option < Interval > */
	"max_n" INT DEFAULT 10 /* Option < i32 > */
) RETURNS TABLE (
	"key_id" bigint,  /* i64 */
	"provider" TEXT,  /* String */
	"model" TEXT,  /* Option < String > */
	"base_url" TEXT,  /* String */
	"secret" TEXT,  /* Option < String > */
	"rechecks" INT  /* i32 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_recheck_due_wrapper';
CREATE  FUNCTION "keypool_recheck_result"(
	"key_id" bigint, /* Option < i64 > */
	"accepted" bool, /* Option < bool > */
	"detail" TEXT DEFAULT NULL, /* Option < & str > */
	"next_check" interval DEFAULT NULL /* Option < Interval > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_recheck_result_wrapper';
CREATE  FUNCTION "keypool_revoke_api_token"(
	"id" bigint /* Option < i64 > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_revoke_api_token_wrapper';
CREATE  FUNCTION "keypool_authenticate_api_token"(
	"token" TEXT /* Option < & str > */
) RETURNS TABLE (
	"token_id" bigint,  /* i64 */
	"user_id" TEXT,  /* Option < String > */
	"pools" TEXT[],  /* :: std :: option :: Option < Vec < String > > */
	"expires_at" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_authenticate_api_token_wrapper';
CREATE  FUNCTION "keypool_authenticate_api_token_sha256"(
	"token_sha256" bytea /* Option < & [u8] > */
) RETURNS TABLE (
	"token_id" bigint,  /* i64 */
	"user_id" TEXT,  /* Option < String > */
	"pools" TEXT[],  /* :: std :: option :: Option < Vec < String > > */
	"expires_at" timestamp with time zone  /* Option < TimestampWithTimeZone > */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_authenticate_api_token_sha256_wrapper';
CREATE  FUNCTION "keypool_transport_key"() RETURNS bytea /* Vec < u8 > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_transport_key_wrapper';
CREATE OR REPLACE FUNCTION "keypool_claim_requests"(
	"worker" TEXT, /* Option < & str > */
	"max_n" INT, /* Option < i32 > */
	"lease" interval /* Option < Interval > */
) RETURNS TABLE (
	"id" bigint,  /* i64 */
	"user_id" TEXT,  /* String */
	"pool" TEXT,  /* String */
	"request" jsonb,  /* JsonB */
	"attempts" INT  /* i32 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_claim_requests_wrapper';
CREATE OR REPLACE FUNCTION "keypool_queue_wake_at"() RETURNS timestamp with time zone /* Option < TimestampWithTimeZone > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_queue_wake_at_wrapper';
CREATE OR REPLACE FUNCTION "keypool_worker_heartbeat"(
	"worker" TEXT, /* Option < & str > */
	"version" TEXT, /* Option < & str > */
	"host" TEXT, /* Option < & str > */
	"pid" INT, /* Option < i32 > */
	"started_at" timestamp with time zone, /* Option < TimestampWithTimeZone > */
	"served" bigint, /* Option < i64 > */
	"failed" bigint, /* Option < i64 > */
	"queue_done" bigint /* Option < i64 > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_worker_heartbeat_wrapper';
CREATE OR REPLACE FUNCTION "keypool_worker_stopped"(
	"worker" TEXT /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_worker_stopped_wrapper';
CREATE OR REPLACE FUNCTION "keypool_models"() RETURNS TABLE (
	"pool" TEXT,  /* String */
	"model" TEXT  /* Option < String > */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_models_wrapper';
CREATE OR REPLACE FUNCTION "keypool_set_price"(
	"provider" TEXT, /* Option < & str > */
	"model" TEXT, /* Option < & str > */
	"input_per_million" NUMERIC, /* Option < AnyNumeric > */
	"output_per_million" NUMERIC, /* Option < AnyNumeric > */
	"per_request" NUMERIC DEFAULT 0 /* Option < AnyNumeric > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_set_price_wrapper';
DROP FUNCTION keypool_usage_report(date, date);
CREATE OR REPLACE FUNCTION "keypool_usage_report"(
	"from_day" date, /* Option < Date > */
	"to_day" date /* Option < Date > */
) RETURNS TABLE (
	"day" date,  /* Date */
	"pool" TEXT,  /* String */
	"key_id" bigint,  /* i64 */
	"label" TEXT,  /* String */
	"provider" TEXT,  /* String */
	"model" TEXT,  /* Option < String > */
	"requests" bigint,  /* i64 */
	"prompt_tokens" bigint,  /* i64 */
	"completion_tokens" bigint,  /* i64 */
	"errors" bigint,  /* i64 */
	"estimated_cost" NUMERIC,  /* Option < AnyNumeric > */
	"budget" NUMERIC,  /* Option < AnyNumeric > */
	"budget_period" TEXT,  /* Option < String > */
	"period_cost" NUMERIC  /* Option < AnyNumeric > */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_usage_report_wrapper';
CREATE OR REPLACE FUNCTION "keypool_enable_keys"(
	"pool" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_enable_keys_wrapper';
CREATE OR REPLACE FUNCTION "keypool_check_alerts"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_check_alerts_wrapper';
CREATE OR REPLACE FUNCTION keypool_submit(user_id text, pool text, request jsonb, max_wait interval DEFAULT '10 minutes',
                               max_attempts integer DEFAULT 3)
RETURNS bigint
AS 'MODULE_PATHNAME', 'keypool_submit_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

CREATE OR REPLACE FUNCTION keypool_result(id bigint, OUT status text, OUT response jsonb, OUT error text)
RETURNS record
AS 'MODULE_PATHNAME', 'keypool_result_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

CREATE OR REPLACE FUNCTION keypool_key_credentials(key_id bigint, OUT provider text, OUT model text, OUT base_url text,
                                        OUT secret text)
RETURNS record
AS 'MODULE_PATHNAME', 'keypool_key_credentials_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

CREATE OR REPLACE FUNCTION keypool_complete_request(id bigint, worker text, outcome text, response jsonb DEFAULT NULL,
                                         error text DEFAULT NULL, retry_at timestamptz DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'keypool_complete_request_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

-- keypool_reserve's answer says when the grant was charged (issue 13: audits such as the soak).
ALTER TYPE keypool_reservation ADD ATTRIBUTE granted_at timestamptz;
-- ... and which pool served it (issue 14: fallback chains), which the caller may narrow.
ALTER TYPE keypool_reservation ADD ATTRIBUTE pool text;
-- ... and what it holds of a spend budget (issue 25: the worker caps the output at it).
ALTER TYPE keypool_reservation ADD ATTRIBUTE budget_held numeric;
ALTER TYPE keypool_reservation ADD ATTRIBUTE minute_remaining bigint;
COMMENT ON TYPE keypool_reservation IS
    'Result of keypool_reserve: a granted key (with its secret) or a refusal, the user''s share today, when the grant was charged, the pool that served, what it holds of a spend budget, and what is left of the caller''s minute';
DROP FUNCTION keypool_reserve(text, text, bigint);
CREATE FUNCTION keypool_reserve(user_id text, pool text DEFAULT 'default', est_tokens bigint DEFAULT 0,
                                within text[] DEFAULT NULL)
RETURNS keypool_reservation
AS 'MODULE_PATHNAME', 'keypool_reserve_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION keypool_reserve(user_id text, pool text, est_tokens bigint, within text[],
                                token_sha256 bytea)
RETURNS keypool_reservation
AS 'MODULE_PATHNAME', 'keypool_reserve_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;
ALTER FUNCTION keypool.routing_state() ROWS 10;
-- keypool_add_key takes a priority.
DROP FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer);
CREATE  FUNCTION "keypool_add_key"(
	"pool" TEXT, /* Option < & str > */
	"provider" TEXT, /* Option < & str > */
	"secret" TEXT, /* Option < & str > */
	"model" TEXT DEFAULT NULL, /* Option < & str > */
	"account" TEXT DEFAULT NULL, /* Option < & str > */
	"rpm" INT DEFAULT NULL, /* Option < i32 > */
	"rpd" INT DEFAULT NULL, /* Option < i32 > */
	"tpm" bigint DEFAULT NULL, /* Option < i64 > */
	"tpd" bigint DEFAULT NULL, /* Option < i64 > */
	"base_url" TEXT DEFAULT NULL, /* Option < & str > */
	"timezone" TEXT DEFAULT NULL, /* Option < & str > */
	"group_no" INT DEFAULT NULL, /* Option < i32 > */
	"priority" INT DEFAULT NULL, /* Option < i32 > */
	"owner" TEXT DEFAULT NULL, /* Option < & str > */
	"max_concurrent" INT DEFAULT NULL /* Option < i32 > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_add_key_wrapper';
-- keypool_settle takes what the provider reported of its limits (issue 28).
DROP FUNCTION keypool_settle(bigint, integer, bigint, bigint, bigint, text);
CREATE  FUNCTION "keypool_settle"(
	"reservation_id" bigint, /* Option < i64 > */
	"status" INT, /* Option < i32 > */
	"prompt_tokens" bigint DEFAULT 0, /* Option < i64 > */
	"completion_tokens" bigint DEFAULT 0, /* Option < i64 > */
	"retry_after_ms" bigint DEFAULT NULL, /* Option < i64 > */
	"error_code" TEXT DEFAULT NULL, /* Option < & str > */
	"remaining_requests" bigint DEFAULT NULL, /* Option < i64 > */
	"requests_reset_ms" bigint DEFAULT NULL, /* Option < i64 > */
	"remaining_tokens" bigint DEFAULT NULL, /* Option < i64 > */
	"tokens_reset_ms" bigint DEFAULT NULL /* Option < i64 > */
) RETURNS TEXT /* String */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_settle_wrapper';
COMMENT ON FUNCTION keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint) IS
    'Records a provider call''s outcome: settles tokens to the actual count, cools, disables or trips keys, holds an account to the room its provider reports; returns the outcome class';
-- keypool_create_pool takes a minute share (issue 28).
DROP FUNCTION keypool_create_pool(text, text, integer, interval, boolean, text);
CREATE  FUNCTION "keypool_create_pool"(
	"name" TEXT, /* Option < & str > */
	"description" TEXT DEFAULT NULL, /* Option < & str > */
	"min_share" INT DEFAULT 0, /* Option < i32 > */
	"active_window" interval DEFAULT NULL, /* Option < Interval > */
	"borrowing" bool DEFAULT false, /* Option < bool > */
	"timezone" TEXT DEFAULT NULL, /* Option < & str > */
	"minute_share" double precision DEFAULT NULL /* Option < f64 > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_create_pool_wrapper';
COMMENT ON FUNCTION keypool_create_pool(text, text, integer, interval, boolean, text, double precision) IS
    'Creates a pool (keys serving one function), how users share its daily capacity and the most of its minute one user may take; returns its id';
-- keypool_alter_pool takes a default cost; keypool_allocation and keypool_usage_report show budgets.
DROP FUNCTION keypool_alter_pool(text, integer, interval, boolean, text, text);
CREATE  FUNCTION "keypool_alter_pool"(
	"name" TEXT, /* Option < & str > */
	"min_share" INT DEFAULT NULL, /* Option < i32 > */
	"active_window" interval DEFAULT NULL, /* Option < Interval > */
	"borrowing" bool DEFAULT NULL, /* Option < bool > */
	"timezone" TEXT DEFAULT NULL, /* Option < & str > */
	"description" TEXT DEFAULT NULL, /* Option < & str > */
	"default_cost" NUMERIC DEFAULT NULL, /* Option < AnyNumeric > */
	"owner_fallback" bool DEFAULT NULL, /* Option < bool > */
	"minute_share" double precision DEFAULT NULL, /* Option < f64 > */
	"user_rpm" INT DEFAULT NULL, /* Option < i32 > */
	"user_tpm" bigint DEFAULT NULL, /* Option < i64 > */
	"user_max_concurrent" INT DEFAULT NULL /* Option < i32 > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_alter_pool_wrapper';
DROP FUNCTION keypool_allocation(text, text);
CREATE  FUNCTION "keypool_allocation"(
	"user_id" TEXT, /* Option < & str > */
	"pool" TEXT DEFAULT 'default' /* Option < & str > */
) RETURNS TABLE (
	"allocated_today" bigint,  /* Option < i64 > */
	"used_today" bigint,  /* i64 */
	"remaining_today" bigint,  /* Option < i64 > */
	"warning_level" TEXT,  /* String */
	"resets_at" timestamp with time zone,  /* TimestampWithTimeZone */
	"allocated_tokens_today" bigint,  /* Option < i64 > */
	"spent" NUMERIC,  /* Option < AnyNumeric > */
	"budget" NUMERIC,  /* Option < AnyNumeric > */
	"budget_resets_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"own_keys_requests_today" bigint,  /* Option < i64 > */
	"requests_this_minute" bigint,  /* Option < i64 > */
	"minute_request_limit" bigint,  /* Option < i64 > */
	"tokens_this_minute" bigint,  /* Option < i64 > */
	"minute_token_limit" bigint,  /* Option < i64 > */
	"open_reservations" INT  /* Option < i32 > */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_allocation_wrapper';
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.price
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();
-- keypool_status() says which timeline its state came from, when recovery ended, and how many
-- reservations are open.
DROP FUNCTION keypool_status();
CREATE  FUNCTION "keypool_status"() RETURNS TABLE (
	"scopes_used" INT,  /* i32 */
	"scopes_capacity" INT,  /* i32 */
	"keys_used" INT,  /* i32 */
	"keys_capacity" INT,  /* i32 */
	"reservation_capacity" INT,  /* i32 */
	"reservations_expired_early" bigint,  /* i64 */
	"reservations_open" bigint,  /* i64 */
	"state_saved_at" timestamp with time zone,  /* Ts */
	"started_from" TEXT,  /* String */
	"state_timeline" INT,  /* Option < i32 > */
	"recovery_ended_at" timestamp with time zone,  /* Ts */
	"callers_untracked" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'keypool_status_wrapper';
-- Internal SQL functions.
CREATE FUNCTION keypool.enqueue(submitted_by regrole, user_id text, pool text, request jsonb, max_wait interval,
                                max_attempts integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
DECLARE
    new_id bigint;
BEGIN
    IF request IS NULL OR jsonb_typeof(request) <> 'object'
       OR jsonb_typeof(request -> 'messages') IS DISTINCT FROM 'array'
       OR request -> 'messages' = '[]'::jsonb THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'request must be an object with a non-empty "messages" array',
            HINT = 'Use the OpenAI chat shape: {"messages": [{"role": "user", "content": "..."}], "max_tokens": 200}';
    END IF;
    IF max_wait IS NULL OR max_wait < interval '0' OR max_wait > interval '7 days' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'max_wait must be between 0 and 7 days';
    END IF;
    IF max_attempts IS NULL OR max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'max_attempts must be between 1 and 100';
    END IF;
    INSERT INTO keypool.request (user_id, pool, request, max_attempts, deadline, submitted_by)
    VALUES (user_id, pool, request, max_attempts, now() + max_wait, submitted_by)
    RETURNING id INTO new_id;
    PERFORM pg_notify('keypool_requests', new_id::text);
    RETURN new_id;
END
$$;

CREATE FUNCTION keypool.claim_requests(claimer regrole, pools text[], worker text, max_n integer, lease interval)
RETURNS TABLE (id bigint, user_id text, pool text, request jsonb, attempts integer)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
#variable_conflict use_column
DECLARE
    gave_up integer;
BEGIN
    WITH g AS (
        UPDATE keypool.request r
           SET status = 'failed', finished_at = now(), claimed_by = NULL, claimed_role = NULL, lease_until = NULL,
               error = concat_ws('; ', r.error, format('its worker stopped answering after %s attempts', r.attempts))
         WHERE r.status = 'running' AND r.lease_until < now() AND r.attempts >= r.max_attempts
           AND r.pool = ANY (pools)
        RETURNING r.id
    )
    SELECT count(pg_notify('keypool_results', g.id::text)) INTO gave_up FROM g;
    RETURN QUERY
    WITH due AS (
        SELECT r.id FROM keypool.request r
         WHERE (r.status = 'queued' OR (r.status = 'running' AND r.lease_until < now()))
           AND r.not_before <= now()
           AND r.pool = ANY (pools)
         ORDER BY r.not_before, r.id
         LIMIT greatest(max_n, 0)
         FOR UPDATE SKIP LOCKED
    )
    UPDATE keypool.request r
       SET status = 'running', claimed_by = worker, claimed_role = claimer, lease_until = now() + lease,
           attempts = r.attempts + 1
      FROM due WHERE r.id = due.id
    RETURNING r.id, r.user_id, r.pool, r.request, r.attempts;
END
$$;

CREATE FUNCTION keypool.complete_request(claimer regrole, id bigint, worker text, outcome text, response jsonb,
                                         error text, retry_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
DECLARE
    r keypool.request;
BEGIN
    IF outcome IS NULL OR outcome NOT IN ('done', 'failed', 'retry', 'wait') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('unknown outcome "%s"', outcome),
            HINT = 'One of done, failed, retry, wait.';
    END IF;
    SELECT * INTO r FROM keypool.request q
     WHERE q.id = complete_request.id AND q.claimed_by = worker AND q.claimed_role = claimer AND q.status = 'running'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF outcome = 'retry' AND r.attempts >= r.max_attempts THEN
        outcome := 'failed';
        error := format('%s (after %s attempts)', error, r.attempts);
    ELSIF outcome = 'wait' AND retry_at > r.deadline THEN
        outcome := 'failed';
        error := format('%s: no capacity before the deadline (%s)', error, r.deadline);
    END IF;
    CASE outcome
        WHEN 'done' THEN
            UPDATE keypool.request q SET status = 'done', response = complete_request.response,
                   error = NULL, finished_at = now(), claimed_by = NULL, claimed_role = NULL, lease_until = NULL
             WHERE q.id = r.id;
        WHEN 'failed' THEN
            UPDATE keypool.request q SET status = 'failed', error = complete_request.error,
                   finished_at = now(), claimed_by = NULL, claimed_role = NULL, lease_until = NULL
             WHERE q.id = r.id;
        WHEN 'retry', 'wait' THEN
            UPDATE keypool.request q SET status = 'queued', error = complete_request.error,
                   not_before = coalesce(retry_at, now()), claimed_by = NULL, claimed_role = NULL, lease_until = NULL,
                   attempts = q.attempts - CASE WHEN outcome = 'wait' THEN 1 ELSE 0 END
             WHERE q.id = r.id;
    END CASE;
    IF outcome IN ('done', 'failed') THEN
        PERFORM pg_notify('keypool_results', r.id::text);
    ELSE
        PERFORM pg_notify('keypool_requests', r.id::text);
    END IF;
    RETURN true;
END
$$;

CREATE FUNCTION keypool.queue_wake_at(pools text[])
RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, keypool, pg_temp AS $$
    SELECT least((SELECT min(r.not_before) FROM keypool.request r WHERE r.status = 'queued' AND r.pool = ANY (pools)),
                 (SELECT min(r.lease_until) FROM keypool.request r WHERE r.status = 'running' AND r.pool = ANY (pools)));
$$;

CREATE OR REPLACE FUNCTION keypool.notify_event() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('keypool_events', new.id::text);
    RETURN NULL;
END
$$;

CREATE FUNCTION keypool.usage_report(pools bigint[], from_day date, to_day date)
RETURNS TABLE (day date, pool text, key_id bigint, label text, provider text, model text, requests bigint,
               prompt_tokens bigint, completion_tokens bigint, errors bigint, estimated_cost numeric,
               budget numeric, budget_period text, period_cost numeric)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    IF from_day IS NULL OR to_day IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'from_day and to_day must not be NULL';
    END IF;
    IF from_day > to_day THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('from_day (%s) is after to_day (%s)', from_day, to_day);
    END IF;
    IF to_day - from_day > 3660 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'the report spans more than ten years';
    END IF;
    -- Spend against budget: each row also carries its pool's budget and what the report's rows
    -- of the same pool and budget period add up to.
    RETURN QUERY
    SELECT r.day, r.pool, r.key_id, r.label, r.provider, r.model, r.requests, r.prompt_tokens,
           r.completion_tokens, r.errors, r.estimated_cost, r.budget, r.budget_period,
           CASE WHEN r.budget_period IS NOT NULL THEN
               sum(r.estimated_cost) OVER (PARTITION BY r.pool,
                   CASE r.budget_period WHEN 'month' THEN date_trunc('month', r.day) ELSE r.day END)
           END
      FROM (
        SELECT d.day, p.name AS pool, k.id AS key_id, k.label, k.provider, k.model,
               sum(u.requests)::bigint AS requests, sum(u.prompt_tokens)::bigint AS prompt_tokens,
               sum(u.completion_tokens)::bigint AS completion_tokens,
               sum(u.rate_limited + u.daily_quota + u.key_invalid + u.billing + u.server_error + u.caller_error + u.other)::bigint AS errors,
               round(sum(u.prompt_tokens) * pr.input_per_million / 1e6 + sum(u.completion_tokens) * pr.output_per_million / 1e6
                     + sum(u.requests - u.released) * pr.per_request, 6) AS estimated_cost,
               (p.budget_micros::numeric / 1000000)::numeric(20, 6) AS budget,
               p.budget_period
          FROM keypool.usage_hourly u
          JOIN keypool.key k ON k.id = u.key_id
          JOIN keypool.pool p ON p.id = k.pool_id
          JOIN keypool.scope s ON s.id = k.scope_id
          CROSS JOIN LATERAL (SELECT (u.hour AT TIME ZONE s.timezone)::date AS day) d
          LEFT JOIN LATERAL (SELECT x.input_per_million, x.output_per_million, x.per_request
                               FROM keypool.price x
                              WHERE x.provider = k.provider AND x.model IN (coalesce(k.model, ''), '')
                              ORDER BY x.model DESC LIMIT 1) pr ON true
         WHERE u.hour >= (from_day - 1)::timestamptz AND u.hour < (to_day + 2)::timestamptz
           AND d.day BETWEEN from_day AND to_day
           AND p.id = ANY (pools)
         GROUP BY d.day, p.name, k.id, k.label, k.provider, k.model, pr.input_per_million, pr.output_per_million,
                  pr.per_request, p.budget_micros, p.budget_period) r
     ORDER BY r.day, r.pool, r.key_id;
END
$$;

CREATE FUNCTION keypool.check_alerts()
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
DECLARE
    raised bigint;
BEGIN
    -- One checker at a time (the background and a caller may overlap).
    PERFORM pg_advisory_xact_lock(hashtext('pg_keypool.check_alerts'));
    WITH cur AS (
        SELECT a.alert_key, a.kind, a.severity, a.message, p.id AS pool_id
          FROM @extschema@.keypool_alerts a LEFT JOIN keypool.pool p ON p.name = a.pool),
    gone AS (
        DELETE FROM keypool.alert a
         WHERE NOT EXISTS (SELECT 1 FROM cur c WHERE c.alert_key = a.alert_key)
        RETURNING a.*),
    new AS (
        INSERT INTO keypool.alert (alert_key, kind, severity, message, raised_at, pool_id)
        SELECT c.alert_key, c.kind, c.severity, c.message, @extschema@.keypool_now(), c.pool_id FROM cur c
         WHERE NOT EXISTS (SELECT 1 FROM keypool.alert a WHERE a.alert_key = c.alert_key)
        RETURNING *),
    events AS (
        INSERT INTO keypool.event (at, kind, pool_id, reason)
        SELECT @extschema@.keypool_now(), e.kind, e.pool_id, e.reason
          FROM (SELECT 1 AS o, g.alert_key, 'alert_cleared' AS kind, g.pool_id, g.kind || ': ' || g.message AS reason
                  FROM gone g
                UNION ALL
                SELECT 2, n.alert_key, 'alert', n.pool_id, n.severity || ' ' || n.kind || ': ' || n.message FROM new n) e
         ORDER BY e.o, e.alert_key
        RETURNING kind)
    SELECT count(*) FILTER (WHERE kind = 'alert') INTO raised FROM events;
    RETURN raised;
END
$$;

CREATE OR REPLACE FUNCTION keypool.maintain()
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    PERFORM keypool.check_alerts();
    DELETE FROM keypool.event e
     WHERE e.at < @extschema@.keypool_now() - coalesce(nullif(current_setting('pg_keypool.event_retention', true), '')::interval,
                                                        interval '30 days');
    DELETE FROM keypool.request r
     WHERE r.status IN ('done', 'failed')
       AND r.finished_at < now() - coalesce(nullif(current_setting('pg_keypool.request_retention', true), '')::interval,
                                            interval '7 days');
    DELETE FROM keypool.pool_grant g
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = g.grantee::oid);
END
$$;

-- Views: each role sees the pools it may read.
CREATE OR REPLACE VIEW keypool_keys WITH (security_barrier) AS
SELECT k.id AS key_id,
       p.name AS pool,
       k.provider,
       k.model,
       s.account,
       k.label,
       CASE
           WHEN k.disabled_reason IS NOT NULL OR s.disabled_reason IS NOT NULL THEN 'disabled'
           WHEN ss.cooling_until IS NOT NULL OR ks.breaker = 'open' THEN 'cooling'
           ELSE 'active'
       END AS state,
       coalesce(k.disabled_reason,
                s.disabled_reason,
                ss.cooling_reason,
                CASE ks.breaker
                    WHEN 'open' THEN 'circuit breaker open after ' || ks.consecutive_failures || ' server errors'
                    WHEN 'half_open' THEN 'circuit breaker half-open: the next request is a trial'
                END) AS reason,
       greatest(ss.cooling_until, ks.breaker_open_until) AS cooling_until,
       ks.last_used_at,
       k.scope_id,
       k.group_no,
       ks.users,
       k.priority,
       k.owner,
       k.max_concurrent,
       CASE WHEN k.max_concurrent IS NOT NULL THEN coalesce(kl.open_reservations, 0) END AS open_reservations
  FROM keypool.key k
  JOIN keypool.pool p ON p.id = k.pool_id
  JOIN keypool.scope s ON s.id = k.scope_id
  LEFT JOIN keypool.scope_state() ss ON ss.scope_id = s.id
  LEFT JOIN keypool.key_state() ks ON ks.key_id = k.id
  LEFT JOIN keypool.key_load() kl ON kl.key_id = k.id
 WHERE k.removed_at IS NULL AND keypool.allowed(k.pool_id, 'read');
COMMENT ON VIEW keypool_keys IS 'Every key: pool, provider, model, masked label, state (active, cooling, disabled) and why, users, priority, owner (a user''s own key), max_concurrent and its reservations open now';

CREATE OR REPLACE VIEW keypool_scopes WITH (security_barrier) AS
SELECT s.id AS scope_id,
       s.provider,
       s.account,
       s.model,
       s.timezone,
       s.rpm, s.rpd, s.tpm, s.tpd,
       ss.requests_this_minute,
       ss.tokens_this_minute,
       ss.requests_today,
       ss.tokens_today,
       ss.day_resets_at,
       ss.cooling_until,
       coalesce(s.disabled_reason, ss.cooling_reason) AS reason,
       (SELECT count(*) FROM keypool.key k WHERE k.scope_id = s.id AND k.removed_at IS NULL) AS keys,
       sp.requests_left AS provider_requests_left,
       sp.tokens_left AS provider_tokens_left,
       sp.held_until AS held_to_provider_until
  FROM keypool.scope s
  LEFT JOIN keypool.scope_state() ss ON ss.scope_id = s.id
  LEFT JOIN keypool.scope_provider_state() sp ON sp.scope_id = s.id
 WHERE keypool.scope_readable(s.id);
COMMENT ON VIEW keypool_scopes IS 'Every quota scope: its limits, requests and tokens this minute and today, cooldown, and what its provider reported when less than that';

CREATE OR REPLACE VIEW keypool_usage WITH (security_barrier) AS
SELECT u.hour,
       p.name AS pool,
       u.key_id,
       k.label,
       u.requests,
       u.released,
       u.prompt_tokens,
       u.completion_tokens,
       u.success,
       u.rate_limited + u.daily_quota + u.key_invalid + u.billing + u.server_error + u.caller_error + u.other AS errors,
       u.rate_limited, u.daily_quota, u.key_invalid, u.billing, u.server_error, u.caller_error, u.other,
       round(u.prompt_tokens * pr.input_per_million / 1e6 + u.completion_tokens * pr.output_per_million / 1e6
             + (u.requests - u.released) * pr.per_request, 6) AS estimated_cost
  FROM keypool.usage_hourly u
  JOIN keypool.key k ON k.id = u.key_id
  JOIN keypool.pool p ON p.id = k.pool_id
  LEFT JOIN LATERAL (SELECT x.input_per_million, x.output_per_million, x.per_request
                       FROM keypool.price x
                      WHERE x.provider = k.provider AND x.model IN (coalesce(k.model, ''), '')
                      ORDER BY x.model DESC LIMIT 1) pr ON true
 WHERE keypool.allowed(k.pool_id, 'read');
COMMENT ON VIEW keypool_usage IS 'Usage per key per hour: requests, tokens, outcomes, estimated cost (keypool_prices; NULL without a price)';

CREATE OR REPLACE VIEW keypool_events WITH (security_barrier) AS
SELECT e.id, e.at, e.kind, p.name AS pool, e.key_id, k.label, e.scope_id, e.reason
  FROM keypool.event e
  LEFT JOIN keypool.pool p ON p.id = e.pool_id
  LEFT JOIN keypool.key k ON k.id = e.key_id
 WHERE CASE WHEN e.pool_id IS NOT NULL THEN keypool.allowed(e.pool_id, 'read')
            WHEN e.scope_id IS NOT NULL THEN keypool.scope_readable(e.scope_id)
            ELSE keypool.allowed(NULL, 'read') END;
COMMENT ON VIEW keypool_events IS
    'What changed and why: keys added, disabled, enabled, removed; rate limits, daily quotas, breakers; accounts disabled; rebalances, usage resets; alerts raised and cleared';

CREATE OR REPLACE VIEW keypool_members WITH (security_barrier) AS
SELECT p.name AS pool, m.user_id, m.key_id, k.group_no, k.label, m.weight, m.last_active, m.assigned_at
  FROM keypool.member m
  JOIN keypool.pool p ON p.id = m.pool_id
  LEFT JOIN keypool.key k ON k.id = m.key_id
 WHERE keypool.allowed(m.pool_id, 'read');
COMMENT ON VIEW keypool_members IS 'Users of each pool: assigned key and group number, weight, last active day';

CREATE OR REPLACE VIEW keypool_pool_stats WITH (security_barrier) AS
SELECT p.id AS pool_id,
       p.name AS pool,
       (SELECT count(*) FROM keypool_keys k WHERE k.pool = p.name AND k.state = 'active') AS keys_usable,
       (SELECT count(*) FROM keypool_keys k WHERE k.pool = p.name AND k.state = 'cooling') AS keys_cooling,
       (SELECT count(*) FROM keypool_keys k WHERE k.pool = p.name AND k.state = 'disabled') AS keys_disabled,
       ps.daily_capacity,
       ps.daily_token_capacity,
       (SELECT coalesce(sum(sc.requests_today), 0) FROM keypool_scopes sc
         WHERE sc.scope_id IN (SELECT k.scope_id FROM keypool.key k
                                WHERE k.pool_id = p.id AND k.removed_at IS NULL)) AS used_today,
       ps.members,
       ps.counted_users,
       ps.active_today,
       p.min_share,
       ps.share_per_user,
       round(ps.overcommit::numeric, 2) AS overcommit,
       p.borrowing,
       ps.borrowed_today,
       p.active_days,
       ps.timezone,
       ps.resets_at,
       (SELECT array_agg(f.name ORDER BY pf.position) FROM keypool.pool_fallback pf
          JOIN keypool.pool f ON f.id = pf.fallback_id
         WHERE pf.pool_id = p.id AND keypool.allowed(f.id, 'read')) AS fallbacks,
       p.fallback_on_quota,
       fs.fell_through_today,
       (p.budget_micros::numeric / 1000000)::numeric(20, 6) AS budget,
       (p.budget_per_user_micros::numeric / 1000000)::numeric(20, 6) AS budget_per_user,
       p.budget_period,
       (fs.spent_micros::numeric / 1000000)::numeric(20, 6) AS spent,
       fs.budget_resets_at,
       (p.default_cost_micros::numeric / 1000000)::numeric(20, 6) AS default_cost
  FROM keypool.pool p
  LEFT JOIN keypool.pool_state() ps ON ps.pool_id = p.id
  LEFT JOIN keypool.routing_state() fs ON fs.pool_id = p.id
 WHERE keypool.allowed(p.id, 'read');
COMMENT ON VIEW keypool_pool_stats IS
    'Every pool: keys usable/cooling/disabled, daily capacity and use, users, share per user, overcommit (> 1: minimum shares exceed capacity), fallback chain and requests it served today, spend budget and what was spent this period';

CREATE OR REPLACE VIEW keypool_key_stats WITH (security_barrier) AS
SELECT k.key_id, k.pool, k.provider, k.model, k.account, k.label, k.group_no, k.state, k.reason, k.cooling_until,
       s.requests_this_minute, s.rpm, round(100.0 * s.requests_this_minute / s.rpm, 1) AS rpm_pct,
       s.tokens_this_minute, s.tpm, round(100.0 * s.tokens_this_minute / s.tpm, 1) AS tpm_pct,
       s.requests_today, s.rpd, round(100.0 * s.requests_today / s.rpd, 1) AS rpd_pct,
       s.tokens_today, s.tpd, round(100.0 * s.tokens_today / s.tpd, 1) AS tpd_pct,
       t.requests AS key_requests_today,
       t.prompt_tokens AS key_prompt_tokens_today,
       t.completion_tokens AS key_completion_tokens_today,
       t.rate_limited + t.daily_quota + t.key_invalid + t.billing + t.server_error + t.caller_error + t.other AS errors_today,
       t.rate_limited, t.daily_quota, t.key_invalid, t.billing, t.server_error, t.caller_error, t.other,
       k.last_used_at, k.users
  FROM keypool_keys k
  JOIN keypool_scopes s ON s.scope_id = k.scope_id
  LEFT JOIN keypool.key_state() ks ON ks.key_id = k.key_id
  CROSS JOIN LATERAL (
      SELECT coalesce(sum(u.requests), 0) + coalesce(ks.unflushed[1], 0) AS requests,
             coalesce(sum(u.prompt_tokens), 0) + coalesce(ks.unflushed[3], 0) AS prompt_tokens,
             coalesce(sum(u.completion_tokens), 0) + coalesce(ks.unflushed[4], 0) AS completion_tokens,
             coalesce(sum(u.rate_limited), 0) + coalesce(ks.unflushed[6], 0) AS rate_limited,
             coalesce(sum(u.daily_quota), 0) + coalesce(ks.unflushed[7], 0) AS daily_quota,
             coalesce(sum(u.key_invalid), 0) + coalesce(ks.unflushed[8], 0) AS key_invalid,
             coalesce(sum(u.billing), 0) + coalesce(ks.unflushed[9], 0) AS billing,
             coalesce(sum(u.server_error), 0) + coalesce(ks.unflushed[10], 0) AS server_error,
             coalesce(sum(u.caller_error), 0) + coalesce(ks.unflushed[11], 0) AS caller_error,
             coalesce(sum(u.other), 0) + coalesce(ks.unflushed[12], 0) AS other
        FROM keypool.usage_hourly u
       WHERE u.key_id = k.key_id
         AND u.hour >= (date_trunc('day', keypool_now() AT TIME ZONE s.timezone) AT TIME ZONE s.timezone)) t;
COMMENT ON VIEW keypool_key_stats IS
    'Per key: state, its account''s use this minute and today against each limit (and %), its own use and errors today by class, users';

CREATE OR REPLACE VIEW keypool_requests WITH (security_barrier) AS
SELECT r.id, r.user_id, r.pool, r.status, r.attempts, r.max_attempts, r.not_before, r.deadline, r.claimed_by,
       r.lease_until, r.error, r.submitted_at, r.finished_at, r.submitted_by
  FROM keypool.request r
 WHERE keypool.acts_for(r.submitted_by)
    OR keypool.allowed((SELECT p.id FROM keypool.pool p WHERE p.name = r.pool), 'admin');
COMMENT ON VIEW keypool_requests IS
    'The SQL request queue: the requests this role submitted (every request of the pools it administers)';

CREATE OR REPLACE VIEW keypool_workers WITH (security_barrier) AS
SELECT w.id, w.version, w.host, w.pid, w.started_at, w.last_seen, now() - w.last_seen AS silent_for, w.served,
       w.failed, w.queue_done, w.stopped_at, w.role
  FROM keypool.worker w
 WHERE keypool.acts_for(w.role) OR keypool.allowed(NULL, 'read');
COMMENT ON VIEW keypool_workers IS 'Workers as their heartbeats report them (this role''s, or all for readers of every pool)';

CREATE OR REPLACE VIEW keypool_alerts WITH (security_barrier) AS
WITH setting AS (
    SELECT coalesce(nullif(current_setting('pg_keypool.alert_threshold', true), '')::float8, 0.8) AS threshold,
           coalesce(nullif(current_setting('pg_keypool.worker_silence', true), '')::interval, interval '1 min') AS silence
), scope_use AS (
    SELECT s.scope_id, s.provider, s.account, s.model, u.what, u.used, u.lim, u.used::float8 / u.lim AS fraction,
           row_number() OVER (PARTITION BY s.scope_id ORDER BY u.used::float8 / u.lim DESC, u.what) AS rank
      FROM keypool_scopes s
     CROSS JOIN LATERAL (VALUES ('requests per minute', s.requests_this_minute, s.rpm::bigint),
                                ('tokens per minute', s.tokens_this_minute, s.tpm),
                                ('requests per day', s.requests_today, s.rpd::bigint),
                                ('tokens per day', s.tokens_today, s.tpd)) u(what, used, lim)
     WHERE u.lim IS NOT NULL AND s.keys > 0
)
SELECT 'scope:' || su.scope_id AS alert_key,
       'scope_near_limit' AS kind,
       CASE WHEN su.fraction >= 1 THEN 'critical' ELSE 'warning' END AS severity,
       (SELECT min(k.pool) FROM keypool_keys k WHERE k.scope_id = su.scope_id) AS pool,
       NULL::bigint AS key_id, su.scope_id, NULL::text AS worker,
       format('account %s (%s%s) is at %s%% of its %s limit (%s of %s)',
              coalesce(su.account, (SELECT min(k.label) FROM keypool_keys k WHERE k.scope_id = su.scope_id)),
              su.provider, coalesce(' ' || su.model, ''), floor(100 * su.fraction)::bigint, su.what, su.used, su.lim) AS message
  FROM scope_use su, setting
 WHERE su.rank = 1 AND su.fraction >= setting.threshold
UNION ALL
SELECT 'key:' || k.key_id,
       CASE k.state WHEN 'disabled' THEN 'key_disabled' ELSE 'key_cooling' END,
       CASE k.state WHEN 'disabled' THEN 'critical' ELSE 'warning' END,
       k.pool, k.key_id, k.scope_id, NULL,
       format('key %s (%s) is %s%s: %s', k.label, k.pool, k.state,
              CASE WHEN k.state = 'cooling' THEN ' until ' || to_char(k.cooling_until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' ELSE '' END,
              coalesce(k.reason, 'no reason given'))
  FROM keypool_keys k
 WHERE k.state <> 'active'
UNION ALL
SELECT 'scope:' || s.scope_id || ':limit_mismatch', 'limit_mismatch', 'warning',
       (SELECT min(k.pool) FROM keypool_keys k WHERE k.scope_id = s.scope_id), NULL, s.scope_id, NULL,
       format('account %s (%s%s): its provider reports %s until %s UTC, less than pg_keypool counts; someone else may use the key, or its limits are set too high',
              coalesce(s.account, (SELECT min(k.label) FROM keypool_keys k WHERE k.scope_id = s.scope_id)),
              s.provider, coalesce(' ' || s.model, ''),
              concat_ws(' and ', s.provider_requests_left || ' requests left', s.provider_tokens_left || ' tokens left'),
              to_char(s.held_to_provider_until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'))
  FROM keypool_scopes s
 WHERE s.held_to_provider_until IS NOT NULL AND (s.rpm IS NOT NULL OR s.tpm IS NOT NULL)
UNION ALL
SELECT 'pool:' || p.pool || ':no_usable_key', 'pool_without_usable_key', 'critical', p.pool, NULL, NULL, NULL,
       format('pool %s has no usable key (%s cooling, %s disabled)', p.pool, p.keys_cooling, p.keys_disabled)
  FROM keypool_pool_stats p
 WHERE p.keys_usable = 0 AND p.keys_cooling + p.keys_disabled > 0
UNION ALL
SELECT 'pool:' || p.pool || ':overcommitted', 'pool_overcommitted', 'warning', p.pool, NULL, NULL, NULL,
       format('pool %s is overcommitted: minimum shares add up to %s x its daily capacity of %s', p.pool, p.overcommit,
              p.daily_capacity)
  FROM keypool_pool_stats p
 WHERE p.overcommit > 1
UNION ALL
SELECT 'pool:' || p.pool || ':budget', 'budget_near_limit',
       CASE WHEN p.spent >= p.budget THEN 'critical' ELSE 'warning' END, p.pool, NULL, NULL, NULL,
       format('pool %s has spent %s of its budget of %s this %s (%s%%); it resets at %s UTC', p.pool, p.spent, p.budget,
              p.budget_period, floor(100 * p.spent / p.budget)::bigint,
              to_char(p.budget_resets_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'))
  FROM keypool_pool_stats p, setting
 WHERE p.budget > 0 AND p.spent >= p.budget * setting.threshold::numeric
UNION ALL
SELECT 'worker:' || w.id, 'worker_silent', 'warning', NULL, NULL, NULL, w.id,
       format('worker %s (%s, pid %s) last seen %s ago', w.id, coalesce(w.host, '?'), coalesce(w.pid::text, '?'),
              date_trunc('second', now() - w.last_seen))
  FROM @extschema@.keypool_workers w, setting
 WHERE w.stopped_at IS NULL AND w.last_seen < now() - setting.silence;
COMMENT ON VIEW keypool_alerts IS
    'What needs attention: accounts near a limit or held to a smaller figure their provider reported, cooling or disabled keys, pools without usable keys, overcommitted or near their budget, silent workers';

CREATE VIEW keypool_queue_depth WITH (security_barrier) AS
SELECT r.pool, r.status, count(*) AS requests, min(r.not_before) AS oldest_due
  FROM keypool.request r
  LEFT JOIN keypool.pool p ON p.name = r.pool
 WHERE r.status IN ('queued', 'running') AND keypool.allowed(p.id, 'read')
 GROUP BY r.pool, r.status;
COMMENT ON VIEW keypool_queue_depth IS 'Requests queued and running per pool (counts only), for the pools this role may read';

CREATE VIEW keypool_grants WITH (security_barrier) AS
SELECT coalesce(p.name, '*') AS pool, g.grantee, g.privilege, g.granted_by, g.granted_at
  FROM keypool.pool_grant g
  LEFT JOIN keypool.pool p ON p.id = g.pool_id
 WHERE keypool.allowed(g.pool_id, 'admin') OR keypool.acts_for(g.grantee);
COMMENT ON VIEW keypool_grants IS
    'Privileges on pools (use, read, admin; pool * = every pool): those of the pools this role administers, and its own';

CREATE VIEW keypool_api_tokens WITH (security_barrier) AS
SELECT t.id, t.label, t.user_id,
       CASE WHEN t.pool_ids IS NOT NULL THEN
           (SELECT array_agg(p.name ORDER BY p.name) FROM keypool.pool p WHERE p.id = ANY (t.pool_ids))
       END AS pools,
       t.created_by, t.created_at, t.last_used_at, t.expires_at, t.revoked_at,
       t.rpm, t.tpm, t.rpd, t.max_concurrent
  FROM keypool.api_token t
 WHERE keypool.acts_for(t.created_by)
    OR CASE WHEN t.pool_ids IS NULL THEN keypool.allowed(NULL, 'admin')
            ELSE NOT EXISTS (SELECT 1 FROM unnest(t.pool_ids) AS i(id) WHERE NOT keypool.allowed(i.id, 'admin')) END;
COMMENT ON VIEW keypool_api_tokens IS
    'API tokens of the worker''s callers: label, user, pools, use, expiry, revocation, limits (never the token); those this role made or administers';

CREATE VIEW keypool_master_keys WITH (security_barrier) AS
SELECT m.key_no, encode(substring(m.fingerprint FROM 1 FOR 8), 'hex') AS fingerprint, min(m.created_at) AS created_at,
       (SELECT count(*) FROM keypool.key k WHERE k.sealed_with = m.key_no) AS secrets
  FROM keypool.master_key m
 WHERE keypool.allowed(NULL, 'admin')
 GROUP BY m.key_no, m.fingerprint;
COMMENT ON VIEW keypool_master_keys IS
    'Master keys of the keyring this database recorded: number, fingerprint (first 8 bytes), how many secrets each seals';

CREATE VIEW keypool_member_memory AS SELECT * FROM keypool.member_memory();
COMMENT ON VIEW keypool_member_memory IS
    'The shared-memory member cache: entries, members and guests cached, free, full stripes, guest entries given to members, requests served from shared guest allowances, bytes, hits, loads, evictions, requests of members served without an entry';

CREATE OR REPLACE FUNCTION keypool.health(
    OUT status text, OUT message text, OUT healthy boolean, OUT keys_total bigint, OUT keys_usable bigint,
    OUT keys_cooling bigint, OUT keys_disabled bigint, OUT requests_per_day numeric, OUT daily_users bigint,
    OUT concurrent_users bigint)
RETURNS SETOF record LANGUAGE sql STABLE SET jit = off SET search_path = pg_catalog, keypool, pg_temp AS $fn$
WITH keys AS (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE state = 'active') AS usable,
           count(*) FILTER (WHERE state = 'cooling') AS cooling,
           count(*) FILTER (WHERE state = 'disabled') AS disabled
      FROM @extschema@.keypool_keys
), pool_scopes AS (
    SELECT DISTINCT pool, scope_id FROM @extschema@.keypool_keys WHERE state <> 'disabled'
), apportioned AS (
    -- A scope that serves n pools counts 1/n in each: the total counts every scope once.
    SELECT ps.pool,
           CASE WHEN bool_and(s.rpd IS NOT NULL) THEN sum(s.rpd::numeric / n.pools) END AS daily_capacity
      FROM pool_scopes ps
      JOIN (SELECT scope_id, count(*) AS pools FROM pool_scopes GROUP BY scope_id) n ON n.scope_id = ps.scope_id
      JOIN @extschema@.keypool_scopes s ON s.scope_id = ps.scope_id
     GROUP BY ps.pool
), pools AS (
    SELECT count(*) FILTER (WHERE st.keys_usable = 0 AND st.keys_cooling + st.keys_disabled > 0) AS without_usable,
           count(*) FILTER (WHERE st.overcommit > 1) AS overcommitted,
           sum(floor(a.daily_capacity / st.min_share)) FILTER (WHERE st.min_share > 0) AS daily_users
      FROM @extschema@.keypool_pool_stats st
      LEFT JOIN apportioned a ON a.pool = st.pool
), capacity AS (
    SELECT CASE WHEN bool_and(rpd IS NOT NULL OR rpm IS NOT NULL)
                THEN sum(coalesce(least(rpd::bigint, rpm::bigint * 1440), rpd, rpm::bigint * 1440)) END AS requests_per_day,
           CASE WHEN bool_and(rpm IS NOT NULL) THEN sum(rpm) END AS requests_per_minute
      FROM @extschema@.keypool_scopes
     WHERE scope_id IN (SELECT scope_id FROM @extschema@.keypool_keys WHERE state = 'active')
), alerts AS (
    SELECT count(*) FILTER (WHERE kind = 'scope_near_limit') AS near_limit FROM @extschema@.keypool_alerts
), verdict AS (
    SELECT CASE
               WHEN keys.total = 0 THEN 'CRITICAL'
               WHEN keys.usable * 4 < keys.total OR pools.without_usable > 0 THEN 'CRITICAL'
               WHEN keys.usable * 4 < keys.total * 3 OR keys.disabled > 0 OR pools.overcommitted > 0 THEN 'DEGRADED'
               WHEN keys.cooling > 0 OR alerts.near_limit > 0 THEN 'GOOD'
               ELSE 'EXCELLENT'
           END AS status
      FROM keys, pools, alerts
)
SELECT v.status,
       CASE v.status
           WHEN 'EXCELLENT' THEN format('Excellent capacity: all %s keys usable, no account near a limit', keys.total)
           WHEN 'GOOD' THEN format('Good: %s of %s keys usable; %s cooling, %s accounts near a limit',
                                   keys.usable, keys.total, keys.cooling, alerts.near_limit)
           WHEN 'DEGRADED' THEN format('Degraded: %s of %s keys usable, %s disabled, %s pools overcommitted',
                                       keys.usable, keys.total, keys.disabled, pools.overcommitted)
           ELSE CASE WHEN keys.total = 0 THEN 'Critical: no keys'
                     ELSE format('Critical: %s of %s keys usable; %s pools without a usable key',
                                 keys.usable, keys.total, pools.without_usable) END
       END AS message,
       v.status IN ('EXCELLENT', 'GOOD') AS healthy,
       keys.total AS keys_total, keys.usable AS keys_usable, keys.cooling AS keys_cooling, keys.disabled AS keys_disabled,
       capacity.requests_per_day,
       floor(pools.daily_users)::bigint AS daily_users,
       floor(capacity.requests_per_minute
             / coalesce(nullif(current_setting('pg_keypool.concurrent_user_rpm', true), '')::float8, 0.5))::bigint
           AS concurrent_users
  FROM verdict v, keys, pools, capacity, alerts;
$fn$;

-- Comments (\df+).
COMMENT ON FUNCTION keypool_alter_pool(text, integer, interval, boolean, text, text, numeric, boolean, double precision, integer, bigint, integer) IS
    'Changes a pool''s min_share, active_window, borrowing, timezone, description, default_cost, owner_fallback or limits on each user''s minute (NULL: unchanged)';
COMMENT ON FUNCTION keypool_allocation(text, text) IS
    'The user''s share of the pool today: allocated, used, remaining, warning level, reset time; their spend and budget this period; their minute in pools that limit it (changes nothing)';
COMMENT ON FUNCTION keypool.routing_state() IS 'Internal: requests each pool''s fallback chain served today, and its spend this budget period (for keypool_pool_stats)';
COMMENT ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer) IS
    'Adds a key to a pool (idempotent per secret); keys with the same account share its limits; owner: a user''s own key; max_concurrent: most reservations open at once; returns the key id';
COMMENT ON FUNCTION keypool_reserve(text, text, bigint, text[]) IS
    'Reserves one request and est_tokens on a key with room now, in the pool or down its fallback chain (only pools in within, when given); refusals are rows (POOL_EXHAUSTED, NO_KEYS, QUOTA_EXCEEDED)';
COMMENT ON FUNCTION keypool_alter_key(bigint, integer, integer) IS
    'Changes a key''s priority (lower is preferred: worse keys serve only while every better key is at its limits) or max_concurrent (0: no limit)';
COMMENT ON FUNCTION keypool_rotate_secret(bigint, text) IS
    'Replaces a key''s secret in place: same id, group number, account, limits, history and users';
COMMENT ON FUNCTION keypool_set_budget(text, numeric, text, numeric) IS
    'Sets the pool''s spend budget per day or month and each user''s (NULLs: none), in the currency of keypool_prices; needs admin';
COMMENT ON FUNCTION keypool_set_fallbacks(text, text[], boolean) IS
    'Sets the pools keypool_reserve tries next, in order, when the pool refuses (empty: none); needs admin on it and use on each';
COMMENT ON FUNCTION keypool_status() IS
    'Shared-memory use and how the state was restored at server start';
COMMENT ON FUNCTION keypool_grant(text, regrole, text) IS
    'Grants a role use, read or admin on a pool (* = every pool, present and future); needs admin on it';
COMMENT ON FUNCTION keypool_revoke(text, regrole, text) IS
    'Takes back a privilege keypool_grant gave; needs admin on the pool (* = every pool)';
COMMENT ON FUNCTION keypool_rotate_master_key() IS
    'Adds a master key to the keyring and reseals every secret of this database with it; returns its number';
COMMENT ON FUNCTION keypool_create_api_token(text, text, text[], timestamptz, integer, bigint, integer, integer) IS
    'Makes an API token for the worker (bound to a user and to pools, or not; with limits or not), returned once; only its hash is kept';
COMMENT ON FUNCTION keypool_alter_api_token(bigint, integer, bigint, integer, integer) IS
    'Changes an API token''s limits: rpm, tpm, rpd, max_concurrent (NULL: unchanged, 0: none)';
COMMENT ON FUNCTION keypool_reserve(text, text, bigint, text[], bytea) IS
    'keypool_reserve for a caller holding an API token (its SHA-256): the token''s limits apply too, across every worker';
COMMENT ON FUNCTION keypool_recheck_due(interval, integer) IS
    'For workers: keys a provider''s answer disabled whose check is due (after, then when the last check said), with what a check needs; claimed for 5 minutes';
COMMENT ON FUNCTION keypool_recheck_result(bigint, boolean, text, interval) IS
    'For workers: what the provider said of a rechecked key: accepted enables it (and its account) again, otherwise it is checked again after next_check';
COMMENT ON FUNCTION keypool_revoke_api_token(bigint) IS
    'Revokes an API token (every worker refuses it within seconds)';
COMMENT ON FUNCTION keypool_authenticate_api_token(text) IS
    'For the worker: the user and pools of a valid API token (no row for an unknown, revoked or expired one)';
COMMENT ON FUNCTION keypool_transport_key() IS
    'This database''s public transport key: clients seal secrets to it (kps1.) so that no statement log holds them';
COMMENT ON FUNCTION keypool_authenticate_api_token_sha256(bytea) IS
    'For the worker: as keypool_authenticate_api_token, given the token''s SHA-256, so that no token reaches a log';
COMMENT ON FUNCTION keypool.allowed(bigint, text) IS
    'Internal: whether the calling role holds a privilege on a pool (NULL: on every pool), for the views';
COMMENT ON FUNCTION keypool.scope_readable(bigint) IS
    'Internal: whether the calling role may read an account (it serves a pool the role may read), for the views';
COMMENT ON FUNCTION keypool.acts_for(oid) IS
    'Internal: whether the calling role has the privileges of a role, for the views';
COMMENT ON FUNCTION keypool_submit(text, text, jsonb, interval, integer) IS
    'Enqueues a chat request (OpenAI shape) for the workers; returns its id';
COMMENT ON FUNCTION keypool_result(bigint) IS
    'Status (queued, running, done, failed), response and error of a request this role submitted';
COMMENT ON FUNCTION keypool_claim_requests(text, integer, interval) IS
    'For workers: claims due requests of the pools this role may use, under a lease (FOR UPDATE SKIP LOCKED)';
COMMENT ON FUNCTION keypool_complete_request(bigint, text, text, jsonb, text, timestamptz) IS
    'For workers: records how a request this role claimed ended (done, failed, retry, wait)';
COMMENT ON FUNCTION keypool_queue_wake_at() IS
    'For workers: when the next request of the pools this role may use falls due or the next lease runs out';
COMMENT ON FUNCTION keypool_worker_heartbeat(text, text, text, integer, timestamptz, bigint, bigint, bigint) IS
    'For workers: records a heartbeat';
COMMENT ON FUNCTION keypool_worker_stopped(text) IS 'For workers: records a clean stop';
COMMENT ON FUNCTION keypool_models() IS 'Every pool this role may use or read and the models its keys serve (no secrets)';
COMMENT ON FUNCTION keypool_key_credentials(bigint) IS
    'For the worker''s validate: provider, model, base URL and secret of a key; needs admin on its pool';
COMMENT ON FUNCTION keypool_set_price(text, text, numeric, numeric, numeric) IS
    'Sets the price of a provider''s model (NULL model: every model) per million input and output tokens and per request';
COMMENT ON FUNCTION keypool_usage_report(date, date) IS
    'Per key per day of the pools this role may read: requests, prompt and completion tokens, errors, estimated cost, and the pool''s budget against the period''s cost';
COMMENT ON FUNCTION keypool_enable_keys(text) IS
    'Re-enables the keys and accounts that provider answers disabled (not those an operator disabled) in a pool, or every pool this role administers; returns how many';
COMMENT ON FUNCTION keypool_check_alerts() IS
    'Records alerts raised and cleared since the last check as events (NOTIFY keypool_events); returns how many were raised';
COMMENT ON FUNCTION keypool.scope_state() IS 'Internal: live window usage of the scopes this role may read (for keypool_scopes)';
COMMENT ON FUNCTION keypool.key_state() IS 'Internal: live circuit breaker state of the keys this role may read (for keypool_keys)';
COMMENT ON FUNCTION keypool.scope_provider_state() IS 'Internal: what providers reported of the scopes this role may read, when less than their windows count (for keypool_scopes)';
COMMENT ON FUNCTION keypool.key_load() IS 'Internal: reservations open now on the keys with a max_concurrent this role may read (for keypool_keys)';
COMMENT ON FUNCTION keypool.member_memory() IS 'Internal: the shared-memory member cache (for keypool_member_memory)';
COMMENT ON FUNCTION keypool.enqueue(regrole, text, text, jsonb, interval, integer) IS
    'Internal: enqueues a request for keypool_submit';
COMMENT ON FUNCTION keypool.claim_requests(regrole, text[], text, integer, interval) IS
    'Internal: claims due requests of the given pools for keypool_claim_requests';
COMMENT ON FUNCTION keypool.complete_request(regrole, bigint, text, text, jsonb, text, timestamptz) IS
    'Internal: records how a claimed request ended for keypool_complete_request';
COMMENT ON FUNCTION keypool.queue_wake_at(text[]) IS 'Internal: when the given pools'' queue next needs a worker';
COMMENT ON FUNCTION keypool.usage_report(bigint[], date, date) IS 'Internal: keypool_usage_report for the pools given';
COMMENT ON FUNCTION keypool.check_alerts() IS 'Internal: keypool_check_alerts, as the extension''s owner';
COMMENT ON FUNCTION keypool.maintain() IS
    'Internal: background upkeep (alerts, event retention, finished queue requests, grants of dropped roles)';
COMMENT ON FUNCTION keypool.notify_event() IS 'Internal: announces every event''s id on channel keypool_events';

-- Privileges: the new functions and views are closed like the rest; the filters the views use
-- answer only about the calling role.
REVOKE ALL ON FUNCTION
    keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint),
    keypool_create_pool(text, text, integer, interval, boolean, text, double precision),
    keypool_grant(text, regrole, text),
    keypool_revoke(text, regrole, text),
    keypool_rotate_master_key(),
    keypool_create_api_token(text, text, text[], timestamptz, integer, bigint, integer, integer),
    keypool_revoke_api_token(bigint),
    keypool_recheck_due(interval, integer),
    keypool_recheck_result(bigint, boolean, text, interval),
    keypool_alter_api_token(bigint, integer, bigint, integer, integer),
    keypool_reserve(text, text, bigint, text[], bytea),
    keypool_authenticate_api_token(text),
    keypool_authenticate_api_token_sha256(bytea),
    keypool_transport_key(),
    keypool_status(),
    keypool_reserve(text, text, bigint, text[]),
    keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer),
    keypool_alter_key(bigint, integer, integer),
    keypool_set_fallbacks(text, text[], boolean),
    keypool_set_budget(text, numeric, text, numeric),
    keypool_rotate_secret(bigint, text),
    keypool_alter_pool(text, integer, interval, boolean, text, text, numeric, boolean, double precision, integer, bigint, integer),
    keypool_allocation(text, text),
    keypool_usage_report(date, date),
    keypool.member_memory(),
    keypool.enqueue(regrole, text, text, jsonb, interval, integer),
    keypool.claim_requests(regrole, text[], text, integer, interval),
    keypool.complete_request(regrole, bigint, text, text, jsonb, text, timestamptz),
    keypool.queue_wake_at(text[]),
    keypool.usage_report(bigint[], date, date),
    keypool.check_alerts()
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keypool.allowed(bigint, text), keypool.scope_readable(bigint), keypool.acts_for(oid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION keypool.routing_state(), keypool.key_load(), keypool.scope_provider_state() TO PUBLIC;
REVOKE ALL ON keypool_queue_depth, keypool_grants, keypool_master_keys, keypool_member_memory, keypool_api_tokens FROM PUBLIC;
