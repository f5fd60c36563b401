-- pg_keypool: the public SQL surface that reads best as SQL: the reservation type and the
-- hot-path function declared against it, the views, the comments psql's \df+ shows, and grants.

CREATE TYPE keypool_reservation AS (
    granted        boolean,
    reservation_id bigint,
    key_id         bigint,
    provider       text,
    model          text,
    base_url       text,
    secret         text,
    error          text,
    retry_after_ms bigint,
    key_label      text
);
COMMENT ON TYPE keypool_reservation IS
    'Result of keypool_reserve: a granted key (with its secret) or a refusal (error, retry_after_ms)';

CREATE FUNCTION keypool_reserve(user_id text, pool text DEFAULT 'default', est_tokens bigint DEFAULT 0)
RETURNS keypool_reservation
AS 'MODULE_PATHNAME', 'keypool_reserve_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

-- Every key with its state. Never shows the secret.
CREATE VIEW keypool_keys AS
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
       k.scope_id
  FROM keypool.key k
  JOIN keypool.pool p ON p.id = k.pool_id
  JOIN keypool.scope s ON s.id = k.scope_id
  LEFT JOIN keypool.scope_state() ss ON ss.scope_id = s.id
  LEFT JOIN keypool.key_state() ks ON ks.key_id = k.id;
COMMENT ON VIEW keypool_keys IS 'Every key: pool, provider, model, masked label, state (active, cooling, disabled) and why';

-- Every quota scope with its limits and what its windows hold right now.
CREATE VIEW keypool_scopes AS
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
       (SELECT count(*) FROM keypool.key k WHERE k.scope_id = s.id) AS keys
  FROM keypool.scope s
  LEFT JOIN keypool.scope_state() ss ON ss.scope_id = s.id;
COMMENT ON VIEW keypool_scopes IS 'Every quota scope: its limits, requests and tokens this minute and today, cooldown';

-- Hourly usage history per key (flushed every pg_keypool.flush_interval).
CREATE VIEW keypool_usage AS
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
       u.rate_limited, u.daily_quota, u.key_invalid, u.billing, u.server_error, u.caller_error, u.other
  FROM keypool.usage_hourly u
  JOIN keypool.key k ON k.id = u.key_id
  JOIN keypool.pool p ON p.id = k.pool_id;
COMMENT ON VIEW keypool_usage IS 'Usage per key per hour: requests, tokens, outcomes';

CREATE VIEW keypool_events AS
SELECT e.id, e.at, e.kind, p.name AS pool, e.key_id, k.label, e.scope_id, e.reason
  FROM keypool.event e
  LEFT JOIN keypool.pool p ON p.id = e.pool_id
  LEFT JOIN keypool.key k ON k.id = e.key_id;
COMMENT ON VIEW keypool_events IS 'What changed and why: keys added, disabled, enabled; scopes disabled';

-- The installation's identity: inserted last, so that its trigger finds every function.
INSERT INTO keypool.instance DEFAULT VALUES;

COMMENT ON FUNCTION keypool_create_pool(text, text) IS
    'Creates a pool, a named set of keys serving one function; returns its id';
COMMENT ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text) IS
    'Adds a key to a pool (idempotent per secret); keys with the same account share its limits; returns the key id';
COMMENT ON FUNCTION keypool_reserve(text, text, bigint) IS
    'Reserves one request and est_tokens on a key with room now; refusals are rows (POOL_EXHAUSTED, NO_KEYS)';
COMMENT ON FUNCTION keypool_settle(bigint, integer, bigint, bigint, bigint, text) IS
    'Records a provider call''s outcome: settles tokens to the actual count, cools, disables or trips keys; returns the outcome class';
COMMENT ON FUNCTION keypool_release(bigint) IS
    'Gives back a reservation whose call was never sent';
COMMENT ON FUNCTION keypool_disable_key(bigint, text) IS
    'Takes a key out of rotation, with a reason, until keypool_enable_key';
COMMENT ON FUNCTION keypool_enable_key(bigint) IS
    'Puts a key (and its account, if billing disabled it) back in rotation and closes its circuit breaker';
COMMENT ON FUNCTION keypool_flush() IS
    'Writes unflushed usage counters to the hourly history now; returns the number of keys written';
COMMENT ON FUNCTION keypool_save_state() IS
    'Writes the rate-window state file now (it is also saved every pg_keypool.state_save_interval)';
COMMENT ON FUNCTION keypool_now() IS
    'The time as pg_keypool sees it in this database (wall time unless keypool_set_clock froze it)';
COMMENT ON FUNCTION keypool_set_clock(timestamptz) IS
    'Test aid, superuser only: freezes pg_keypool''s clock in this database; NULL returns to wall time';
COMMENT ON FUNCTION keypool_status() IS
    'Shared-memory use and how the state was restored at server start';
COMMENT ON FUNCTION keypool.scope_state() IS 'Internal: live window usage of every scope (for keypool_scopes)';
COMMENT ON FUNCTION keypool.key_state() IS 'Internal: live circuit breaker state of every key (for keypool_keys)';
COMMENT ON FUNCTION keypool.note_config_change() IS 'Internal: marks configuration caches stale (trigger helper)';
COMMENT ON FUNCTION keypool.config_changed() IS 'Internal: trigger on the configuration tables';

-- Nothing is open to PUBLIC: grant EXECUTE on the functions and SELECT on the views to the
-- roles that need them (see README, "Roles").
REVOKE ALL ON FUNCTION
    keypool_create_pool(text, text),
    keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text),
    keypool_reserve(text, text, bigint),
    keypool_settle(bigint, integer, bigint, bigint, bigint, text),
    keypool_release(bigint),
    keypool_disable_key(bigint, text),
    keypool_enable_key(bigint),
    keypool_flush(),
    keypool_save_state(),
    keypool_now(),
    keypool_set_clock(timestamptz),
    keypool_status(),
    keypool.scope_state(),
    keypool.key_state(),
    keypool.note_config_change(),
    keypool.config_changed()
FROM PUBLIC;
REVOKE ALL ON keypool_keys, keypool_scopes, keypool_usage, keypool_events FROM PUBLIC;
