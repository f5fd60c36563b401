-- pg_keypool: the public SQL surface that reads best as SQL: the reservation type and the
-- hot-path function declared against it, the views, the comments psql's \df+ shows, and grants.
--
-- Every view shows a role only the pools it may read (keypool_grant(pool, role, 'read'), or
-- 'admin'): the rows are filtered with keypool.allowed() as the querying role, and the views
-- are security barriers, so that no function in a caller's query sees the rows filtered out.

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
    warning_level  text,
    granted_at     timestamptz,
    pool           text,
    budget_held    numeric,
    minute_remaining bigint
);
COMMENT ON TYPE keypool_reservation IS
    'Result of keypool_reserve: a granted key (with its secret) or a refusal, the user''s share today, when the grant was charged, the pool that served, what it holds of a spend budget, and what is left of the caller''s minute';

CREATE FUNCTION keypool_reserve(user_id text, pool text DEFAULT 'default', est_tokens bigint DEFAULT 0,
                                within text[] DEFAULT NULL)
RETURNS keypool_reservation
AS 'MODULE_PATHNAME', 'keypool_reserve_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;
-- The same for a caller holding an API token: the token's limits apply too (the worker passes
-- the SHA-256 of the token it was given). Its own signature, so that the four-argument calls
-- and the grants on them stay as they are.
CREATE FUNCTION keypool_reserve(user_id text, pool text, est_tokens bigint, within text[],
                                token_sha256 bytea)
RETURNS keypool_reservation
AS 'MODULE_PATHNAME', 'keypool_reserve_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

-- The state functions return a row per scope, key or pool. The default estimate (1000 rows)
-- makes the stats views look expensive enough for JIT, which costs more than they do.
ALTER FUNCTION keypool.scope_state() ROWS 100;
ALTER FUNCTION keypool.key_state() ROWS 100;
ALTER FUNCTION keypool.key_load() ROWS 10;
ALTER FUNCTION keypool.scope_provider_state() ROWS 10;
ALTER FUNCTION keypool.pool_state() ROWS 10;
ALTER FUNCTION keypool.routing_state() ROWS 10;

-- Every key with its state. Never shows the secret.
CREATE VIEW keypool_keys WITH (security_barrier) AS
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

-- Every quota scope with its limits and what its windows hold right now.
CREATE VIEW keypool_scopes WITH (security_barrier) AS
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

-- Hourly usage history per key (flushed every pg_keypool.flush_interval).
CREATE VIEW keypool_usage WITH (security_barrier) AS
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

-- Events of a pool need `read` on it; events of an account, `read` on a pool it serves; events
-- of no pool (master keys, alerts about workers), `read` on every pool.
CREATE VIEW keypool_events WITH (security_barrier) AS
SELECT e.id, e.at, e.kind, p.name AS pool, e.key_id, k.label, e.scope_id, e.reason
  FROM keypool.event e
  LEFT JOIN keypool.pool p ON p.id = e.pool_id
  LEFT JOIN keypool.key k ON k.id = e.key_id
 WHERE CASE WHEN e.pool_id IS NOT NULL THEN keypool.allowed(e.pool_id, 'read')
            WHEN e.scope_id IS NOT NULL THEN keypool.scope_readable(e.scope_id)
            ELSE keypool.allowed(NULL, 'read') END;
COMMENT ON VIEW keypool_events IS
    'What changed and why: keys added, disabled, enabled, removed; rate limits, daily quotas, breakers; accounts disabled; rebalances, usage resets; alerts raised and cleared';

-- Users of each pool: their key (and its group number), weight, last active day.
CREATE VIEW keypool_members WITH (security_barrier) AS
SELECT p.name AS pool, m.user_id, m.key_id, k.group_no, k.label, m.weight, m.last_active, m.assigned_at
  FROM keypool.member m
  JOIN keypool.pool p ON p.id = m.pool_id
  LEFT JOIN keypool.key k ON k.id = m.key_id
 WHERE keypool.allowed(m.pool_id, 'read');
COMMENT ON VIEW keypool_members IS 'Users of each pool: assigned key and group number, weight, last active day';

-- Every pool: its keys by state, daily capacity and use, users and their share, overcommit.
CREATE VIEW keypool_pool_stats WITH (security_barrier) AS
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

-- Every key with its account's use against each limit, its own use and errors today, users.
-- Limits belong to the account (scope): the *_this_minute / *_today columns and percentages
-- are the account's, shared by the keys of that account; key_* columns are this key's own.
-- "Today" is the account's day (its time zone), counted from the hourly history plus what has
-- not been flushed yet.
CREATE VIEW keypool_key_stats WITH (security_barrier) AS
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

-- Prices used by keypool_usage_report (keypool_set_price edits them).
CREATE VIEW keypool_prices AS
SELECT provider, nullif(model, '') AS model, input_per_million, output_per_million, per_request, updated_at
  FROM keypool.price;
COMMENT ON VIEW keypool_prices IS 'Prices per provider and model (NULL: every model) for cost estimates';

-- The requests a role sees: those it submitted (or a role it acts for did), and every request
-- of the pools it administers. The request bodies and answers are only in keypool_result.
CREATE VIEW keypool_requests WITH (security_barrier) AS
SELECT r.id, r.user_id, r.pool, r.status, r.attempts, r.max_attempts, r.not_before, r.deadline, r.claimed_by,
       r.lease_until, r.error, r.submitted_at, r.finished_at, r.submitted_by
  FROM keypool.request r
 WHERE keypool.acts_for(r.submitted_by)
    OR keypool.allowed((SELECT p.id FROM keypool.pool p WHERE p.name = r.pool), 'admin');
COMMENT ON VIEW keypool_requests IS
    'The SQL request queue: the requests this role submitted (every request of the pools it administers)';

-- How many requests wait and run, per pool the role may read: counts only, nobody's requests.
CREATE VIEW keypool_queue_depth WITH (security_barrier) AS
SELECT r.pool, r.status, count(*) AS requests, min(r.not_before) AS oldest_due
  FROM keypool.request r
  LEFT JOIN keypool.pool p ON p.name = r.pool
 WHERE r.status IN ('queued', 'running') AND keypool.allowed(p.id, 'read')
 GROUP BY r.pool, r.status;
COMMENT ON VIEW keypool_queue_depth IS 'Requests queued and running per pool (counts only), for the pools this role may read';

-- Workers as their heartbeats report them: a role sees its own workers; readers of every pool
-- see all.
CREATE VIEW keypool_workers WITH (security_barrier) AS
SELECT w.id, w.version, w.host, w.pid, w.started_at, w.last_seen, now() - w.last_seen AS silent_for, w.served,
       w.failed, w.queue_done, w.stopped_at, w.role
  FROM keypool.worker w
 WHERE keypool.acts_for(w.role) OR keypool.allowed(NULL, 'read');
COMMENT ON VIEW keypool_workers IS 'Workers as their heartbeats report them (this role''s, or all for readers of every pool)';

-- What needs attention now. alert_key identifies an alert across checks (keypool_check_alerts).
CREATE VIEW keypool_alerts WITH (security_barrier) AS
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


-- Who may use, read or administer which pool: the grants on the pools this role administers,
-- and this role's own.
CREATE VIEW keypool_grants WITH (security_barrier) AS
SELECT coalesce(p.name, '*') AS pool, g.grantee, g.privilege, g.granted_by, g.granted_at
  FROM keypool.pool_grant g
  LEFT JOIN keypool.pool p ON p.id = g.pool_id
 WHERE keypool.allowed(g.pool_id, 'admin') OR keypool.acts_for(g.grantee);
COMMENT ON VIEW keypool_grants IS
    'Privileges on pools (use, read, admin; pool * = every pool): those of the pools this role administers, and its own';

-- API tokens of keypool-worker's callers (never the token or its hash): those this role made,
-- and those of the pools it administers (every pool, for tokens bound to none).
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

-- The master keys this database's secrets are sealed with (administrators of every pool).
CREATE VIEW keypool_master_keys WITH (security_barrier) AS
SELECT m.key_no, encode(substring(m.fingerprint FROM 1 FOR 8), 'hex') AS fingerprint, min(m.created_at) AS created_at,
       (SELECT count(*) FROM keypool.key k WHERE k.sealed_with = m.key_no) AS secrets
  FROM keypool.master_key m
 WHERE keypool.allowed(NULL, 'admin')
 GROUP BY m.key_no, m.fingerprint;
COMMENT ON VIEW keypool_master_keys IS
    'Master keys of the keyring this database recorded: number, fingerprint (first 8 bytes), how many secrets each seals';

-- The server's shared-memory member cache (pg_keypool.max_members): members and guests cached,
-- free entries, what floods of unknown user ids cost, and how the cache does.
CREATE VIEW keypool_member_memory AS SELECT * FROM keypool.member_memory();
COMMENT ON VIEW keypool_member_memory IS
    'The shared-memory member cache: entries, members and guests cached, free, full stripes, guest entries given to members, requests served from shared guest allowances, bytes, hits, loads, evictions, requests of members served without an entry';

-- One row: how the whole installation is doing, and what it can serve.
-- The health verdict reads every other stats view; planned as one query its estimated cost on
-- small, never-analysed tables passes jit_above_cost, and JIT compilation would take longer
-- (hundreds of ms) than the query. Planned inside a function, with JIT off.
CREATE FUNCTION keypool.health(
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
COMMENT ON FUNCTION keypool.health() IS 'Internal: the row of keypool_health (planned without JIT)';
CREATE VIEW keypool_health AS SELECT * FROM keypool.health();
COMMENT ON VIEW keypool_health IS
    'One row: EXCELLENT, GOOD, DEGRADED or CRITICAL with a message, keys by state, and estimated capacity (requests per day, daily users at the minimum share, concurrent users)';

-- The installation's identity: inserted last, so that its trigger finds every function.
INSERT INTO keypool.instance DEFAULT VALUES;

COMMENT ON FUNCTION keypool_create_pool(text, text, integer, interval, boolean, text, double precision) IS
    'Creates a pool (keys serving one function), how users share its daily capacity and the most of its minute one user may take; returns its id';
COMMENT ON FUNCTION keypool_alter_pool(text, integer, interval, boolean, text, text, numeric, boolean, double precision, integer, bigint, integer) IS
    'Changes a pool''s min_share, active_window, borrowing, timezone, description, default_cost, owner_fallback or limits on each user''s minute (NULL: unchanged)';
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
    'The user''s share of the pool today: allocated, used, remaining, warning level, reset time; their spend and budget this period; their minute in pools that limit it (changes nothing)';
COMMENT ON FUNCTION keypool_can_request(text, text) IS
    'Whether a reservation by the user would now pass the quota check (changes nothing)';
COMMENT ON FUNCTION keypool.pool_state() IS 'Internal: how every pool shares its capacity (for keypool_pool_stats)';
COMMENT ON FUNCTION keypool.routing_state() IS 'Internal: requests each pool''s fallback chain served today, and its spend this budget period (for keypool_pool_stats)';
COMMENT ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer) IS
    'Adds a key to a pool (idempotent per secret); keys with the same account share its limits; owner: a user''s own key; max_concurrent: most reservations open at once; returns the key id';
COMMENT ON FUNCTION keypool_reserve(text, text, bigint, text[]) IS
    'Reserves one request and est_tokens on a key with room now, in the pool or down its fallback chain (only pools in within, when given); refusals are rows (POOL_EXHAUSTED, NO_KEYS, QUOTA_EXCEEDED)';
COMMENT ON FUNCTION keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint) IS
    'Records a provider call''s outcome: settles tokens to the actual count, cools, disables or trips keys, holds an account to the room its provider reports; returns the outcome class';
COMMENT ON FUNCTION keypool_classify(integer, text) IS
    'The outcome class keypool_settle would record for an HTTP status and provider error code (changes nothing)';
COMMENT ON FUNCTION keypool_release(bigint) IS
    'Gives back a reservation whose call was never sent';
COMMENT ON FUNCTION keypool_alter_key(bigint, integer, integer) IS
    'Changes a key''s priority (lower is preferred: worse keys serve only while every better key is at its limits) or max_concurrent (0: no limit)';
COMMENT ON FUNCTION keypool_rotate_secret(bigint, text) IS
    'Replaces a key''s secret in place: same id, group number, account, limits, history and users';
COMMENT ON FUNCTION keypool_set_budget(text, numeric, text, numeric) IS
    'Sets the pool''s spend budget per day or month and each user''s (NULLs: none), in the currency of keypool_prices; needs admin';
COMMENT ON FUNCTION keypool_set_fallbacks(text, text[], boolean) IS
    'Sets the pools keypool_reserve tries next, in order, when the pool refuses (empty: none); needs admin on it and use on each';
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
COMMENT ON FUNCTION keypool_reset_usage(text) IS
    'Starts counting again for a pool''s accounts and users (or every pool): minute and day windows, cooldowns, users'' use today; returns accounts reset';
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
COMMENT ON FUNCTION keypool.note_config_change() IS 'Internal: marks configuration caches stale (trigger helper)';
COMMENT ON FUNCTION keypool.config_changed() IS 'Internal: trigger on the configuration tables';
COMMENT ON FUNCTION keypool.member_memory() IS 'Internal: the shared-memory member cache (for keypool_member_memory)';

-- Nothing is open to PUBLIC: grant EXECUTE on the functions and SELECT on the views to the
-- roles that need them, and privileges on pools with keypool_grant (see README, "Roles"). The
-- views' filter functions are open: they answer only about the calling role.
REVOKE ALL ON FUNCTION
    keypool_create_pool(text, text, integer, interval, boolean, text, double precision),
    keypool_alter_pool(text, integer, interval, boolean, text, text, numeric, boolean, double precision, integer, bigint, integer),
    keypool_assign(text, text),
    keypool_on_signup(),
    keypool_backfill(regclass, text, text, text),
    keypool_rebalance(text),
    keypool_remove_key(bigint),
    keypool_set_user_weight(text, text, numeric),
    keypool_allocation(text, text),
    keypool_can_request(text, text),
    keypool.pool_state(),
    keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer),
    keypool_reserve(text, text, bigint, text[]),
    keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint),
    keypool_release(bigint),
    keypool_classify(integer, text),
    keypool_alter_key(bigint, integer, integer),
    keypool_set_fallbacks(text, text[], boolean),
    keypool_set_budget(text, numeric, text, numeric),
    keypool_rotate_secret(bigint, text),
    keypool_disable_key(bigint, text),
    keypool_enable_key(bigint),
    keypool_flush(),
    keypool_save_state(),
    keypool_now(),
    keypool_set_clock(timestamptz),
    keypool_status(),
    keypool.scope_state(),
    keypool.key_state(),
    keypool.health(),
    keypool.member_memory(),
    keypool.note_config_change(),
    keypool.config_changed(),
    keypool_reset_usage(text),
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
    keypool_submit(text, text, jsonb, interval, integer),
    keypool_result(bigint),
    keypool_claim_requests(text, integer, interval),
    keypool_complete_request(bigint, text, text, jsonb, text, timestamptz),
    keypool_queue_wake_at(),
    keypool_worker_heartbeat(text, text, text, integer, timestamptz, bigint, bigint, bigint),
    keypool_worker_stopped(text),
    keypool_models(),
    keypool_key_credentials(bigint),
    keypool_set_price(text, text, numeric, numeric, numeric),
    keypool_usage_report(date, date),
    keypool_enable_keys(text),
    keypool_check_alerts()
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keypool.allowed(bigint, text), keypool.scope_readable(bigint), keypool.acts_for(oid) TO PUBLIC;
-- Answers only about the pools the calling role may read (so keypool_pool_stats needs no new grant).
GRANT EXECUTE ON FUNCTION keypool.routing_state(), keypool.key_load(), keypool.scope_provider_state() TO PUBLIC;
REVOKE ALL ON keypool_keys, keypool_scopes, keypool_usage, keypool_events, keypool_members, keypool_pool_stats,
    keypool_key_stats, keypool_prices, keypool_alerts, keypool_health, keypool_requests, keypool_workers,
    keypool_queue_depth, keypool_grants, keypool_master_keys, keypool_member_memory, keypool_api_tokens FROM PUBLIC;
