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
    key_label      text,
    remaining_today bigint,
    allocated_today bigint,
    warning_level  text
);
COMMENT ON TYPE keypool_reservation IS
    'Result of keypool_reserve: a granted key (with its secret) or a refusal, and the user''s share today';

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
       k.scope_id,
       k.group_no,
       ks.users
  FROM keypool.key k
  JOIN keypool.pool p ON p.id = k.pool_id
  JOIN keypool.scope s ON s.id = k.scope_id
  LEFT JOIN keypool.scope_state() ss ON ss.scope_id = s.id
  LEFT JOIN keypool.key_state() ks ON ks.key_id = k.id
 WHERE k.removed_at IS NULL;
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
       (SELECT count(*) FROM keypool.key k WHERE k.scope_id = s.id AND k.removed_at IS NULL) AS keys
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

-- Users of each pool: their key (and its group number), weight, last active day.
CREATE VIEW keypool_members AS
SELECT p.name AS pool, m.user_id, m.key_id, k.group_no, k.label, m.weight, m.last_active, m.assigned_at
  FROM keypool.member m
  JOIN keypool.pool p ON p.id = m.pool_id
  LEFT JOIN keypool.key k ON k.id = m.key_id;
COMMENT ON VIEW keypool_members IS 'Users of each pool: assigned key and group number, weight, last active day';

-- Every pool: its keys by state, daily capacity and use, users and their share, overcommit.
CREATE VIEW keypool_pool_stats AS
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
       ps.resets_at
  FROM keypool.pool p
  LEFT JOIN keypool.pool_state() ps ON ps.pool_id = p.id;
COMMENT ON VIEW keypool_pool_stats IS
    'Every pool: keys usable/cooling/disabled, daily capacity and use, users, share per user, overcommit (> 1: minimum shares exceed capacity)';

-- The installation's identity: inserted last, so that its trigger finds every function.
INSERT INTO keypool.instance DEFAULT VALUES;

COMMENT ON FUNCTION keypool_create_pool(text, text, integer, interval, boolean, text) IS
    'Creates a pool (keys serving one function) and how users share its daily capacity; returns its id';
COMMENT ON FUNCTION keypool_alter_pool(text, integer, interval, boolean, text, text) IS
    'Changes a pool''s min_share, active_window, borrowing, timezone or description (NULL: unchanged)';
COMMENT ON FUNCTION keypool_assign(text, text) IS
    'The user''s key in the pool; a new user gets the usable key with the fewest users (idempotent)';
COMMENT ON FUNCTION keypool_on_signup() IS
    'Trigger: keypool_on_signup(pool, id_column [, group_column]) assigns the new row''s user and writes the key''s group number';
COMMENT ON FUNCTION keypool_backfill(regclass, text, text, text) IS
    'Assigns every user of an existing table in batches, balanced and idempotent; returns how many were newly assigned';
COMMENT ON FUNCTION keypool_rebalance(text) IS
    'Moves the fewest users needed so that users per usable key differ by at most one; returns how many moved';
COMMENT ON FUNCTION keypool_remove_key(bigint) IS
    'Removes a key from its pool (history kept) and reassigns its users; returns how many moved';
COMMENT ON FUNCTION keypool_set_user_weight(text, text, numeric) IS
    'Sets the user''s weight in the pool''s fair share (tiers such as free 1, pro 5)';
COMMENT ON FUNCTION keypool_allocation(text, text) IS
    'The user''s share of the pool today: allocated, used, remaining, warning level, reset time (changes nothing)';
COMMENT ON FUNCTION keypool_can_request(text, text) IS
    'Whether a reservation by the user would now pass the quota check (changes nothing)';
COMMENT ON FUNCTION keypool.pool_state() IS 'Internal: how every pool shares its capacity (for keypool_pool_stats)';
COMMENT ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer) IS
    'Adds a key to a pool (idempotent per secret); keys with the same account share its limits; returns the key id';
COMMENT ON FUNCTION keypool_reserve(text, text, bigint) IS
    'Reserves one request and est_tokens on a key with room now; refusals are rows (POOL_EXHAUSTED, NO_KEYS)';
COMMENT ON FUNCTION keypool_settle(bigint, integer, bigint, bigint, bigint, text) IS
    'Records a provider call''s outcome: settles tokens to the actual count, cools, disables or trips keys; returns the outcome class';
COMMENT ON FUNCTION keypool_classify(integer, text) IS
    'The outcome class keypool_settle would record for an HTTP status and provider error code (changes nothing)';
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
    keypool_create_pool(text, text, integer, interval, boolean, text),
    keypool_alter_pool(text, integer, interval, boolean, text, text),
    keypool_assign(text, text),
    keypool_on_signup(),
    keypool_backfill(regclass, text, text, text),
    keypool_rebalance(text),
    keypool_remove_key(bigint),
    keypool_set_user_weight(text, text, numeric),
    keypool_allocation(text, text),
    keypool_can_request(text, text),
    keypool.pool_state(),
    keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer),
    keypool_reserve(text, text, bigint),
    keypool_settle(bigint, integer, bigint, bigint, bigint, text),
    keypool_release(bigint),
    keypool_classify(integer, text),
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
REVOKE ALL ON keypool_keys, keypool_scopes, keypool_usage, keypool_events, keypool_members, keypool_pool_stats FROM PUBLIC;
