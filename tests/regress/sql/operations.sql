-- Operations in SQL: key stats, usage report with prices, alerts, health, events, reset and
-- re-enabling. In a database of its own, so that the installation-wide views (health, alerts)
-- see only what this test sets up; the clock is frozen.
CREATE DATABASE keypool_ops;
\c keypool_ops
SET client_min_messages = warning;
CREATE EXTENSION pg_keypool;
CREATE FUNCTION try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ' ' || SQLERRM;
END
$$;
SELECT keypool_set_clock('2026-03-02 10:00:00+00');

-- Nothing configured: critical, nothing to estimate.
SELECT status, message, healthy, keys_total, requests_per_day, daily_users, concurrent_users FROM keypool_health;

-- Seed 004: xAI keys with 480 requests and 2,000,000 tokens per minute, no daily limit; and a
-- Gemini pool with per-day limits and a minimum share of 30.
SELECT keypool_create_pool('xai') > 0 AS xai;
SELECT count(keypool_add_key('xai', 'xai', 'xai-ops-key-' || i || '-0000000000', 'grok-4-fast', rpm => 480, tpm => 2000000))
  FROM generate_series(1, 4) i;
SELECT keypool_create_pool('gemini', min_share => 30) > 0 AS gemini;
SELECT count(keypool_add_key('gemini', 'gemini', 'AIza-ops-key-' || i || '-00000000', 'gemini-2.5-flash',
                             rpm => 10, rpd => 250, tpm => 250000))
  FROM generate_series(1, 2) i;
SELECT status, message, healthy, keys_total, keys_usable, requests_per_day, daily_users, concurrent_users FROM keypool_health;
SELECT count(*) AS alerts FROM keypool_alerts;

-- Traffic on the Gemini pool: 8 requests on each key's account this minute (80% of 10 rpm).
SELECT count(*) FILTER (WHERE (r).granted) AS granted
  FROM (SELECT keypool_reserve('user-' || i, 'gemini', 1000) AS r FROM generate_series(1, 16) i) s;
-- Settle them: successes with real usage, one caller error, one server error.
SELECT keypool_settle(reservation_id, 200, prompt_tokens => 600, completion_tokens => 150) IS NOT NULL AS settled
  FROM keypool_reserve('user-a', 'xai', 1000);
CREATE TEMP TABLE open_reservations AS SELECT reservation_id, key_id FROM keypool_reserve('user-b', 'xai', 10);
SELECT keypool_settle(reservation_id, 400, error_code => 'invalid_request_error') FROM open_reservations;
DELETE FROM open_reservations;
INSERT INTO open_reservations SELECT reservation_id, key_id FROM keypool_reserve('user-c', 'xai', 10);
SELECT keypool_settle(reservation_id, 503) FROM open_reservations;

-- Per key: the account's use against each limit, the key's own counts and errors today.
SELECT key_id, pool, label, state, requests_this_minute, rpm, rpm_pct, tokens_this_minute, tpm, tpm_pct,
       requests_today, rpd, rpd_pct
  FROM keypool_key_stats ORDER BY key_id;
SELECT key_id, key_requests_today, key_prompt_tokens_today, key_completion_tokens_today, errors_today,
       caller_error, server_error, users, last_used_at
  FROM keypool_key_stats WHERE pool = 'xai' ORDER BY key_id;
-- The same after the counters reach the hourly history.
SELECT keypool_flush() AS flushed;
SELECT key_id, key_requests_today, key_prompt_tokens_today, errors_today FROM keypool_key_stats WHERE pool = 'xai' ORDER BY key_id;

-- Alerts: both Gemini accounts are at 80% of their requests per minute.
SELECT alert_key, kind, severity, pool, message FROM keypool_alerts ORDER BY alert_key;
SELECT status, message, healthy FROM keypool_health;

-- A 429 cools key 5's account; a 401 disables key 6: events, alerts, health.
SELECT reservation_id AS r429 FROM keypool_reserve('user-x', 'gemini') WHERE key_id = 5 \gset
SELECT keypool_settle(:r429, 429, retry_after_ms => 30000, error_code => 'RESOURCE_EXHAUSTED');
SELECT reservation_id AS r401 FROM keypool_reserve('user-z', 'gemini') WHERE key_id = 6 \gset
SELECT keypool_settle(:r401, 400, error_code => 'API_KEY_INVALID');
SELECT kind, pool, key_id, label, reason FROM keypool_events WHERE kind NOT IN ('key_added') ORDER BY id;
SELECT alert_key, kind, severity, message FROM keypool_alerts ORDER BY alert_key;
SELECT status, message, healthy, keys_usable, keys_cooling, keys_disabled FROM keypool_health;

-- keypool_check_alerts records what was raised (and, later, cleared) as events.
SELECT keypool_check_alerts() AS raised;
SELECT keypool_check_alerts() AS raised_again;
SELECT kind, reason FROM keypool_events WHERE kind IN ('alert', 'alert_cleared') ORDER BY id;

-- Five server errors in a row open a key's circuit breaker: one event, when it opens.
SELECT keypool_create_pool('solo') > 0 AS solo;
SELECT keypool_add_key('solo', 'openai', 'sk-ops-solo-000000000000', 'gpt-4o-mini') AS solo_key \gset
SELECT string_agg(keypool_settle((r).reservation_id, 503), ', ') AS outcomes
  FROM (SELECT keypool_reserve('user-s' || i, 'solo') AS r FROM generate_series(1, 5) i) s;
SELECT granted, error FROM keypool_reserve('user-s9', 'solo');
SELECT kind, key_id = :solo_key AS solo_key, regexp_replace(reason, 'until .*', 'until ...') AS reason
  FROM keypool_events WHERE kind = 'breaker_open';

-- Workers: a silent one is reported; one that stopped cleanly is not.
SELECT keypool_worker_heartbeat('w-silent', '0.1.0', 'host-a', 101, now() - interval '1 hour', 5, 0, 0);
SELECT keypool_worker_heartbeat('w-stopped', '0.1.0', 'host-b', 102, now() - interval '1 hour', 7, 0, 1);
UPDATE keypool.worker SET last_seen = now() - interval '10 minutes';
SELECT keypool_worker_stopped('w-stopped');
UPDATE keypool.worker SET last_seen = now() - interval '10 minutes';
SELECT alert_key, kind, regexp_replace(message, 'last seen .*', 'last seen ...') AS message
  FROM keypool_alerts WHERE kind = 'worker_silent';

-- Overcommitted: 20 members x 30 minimum > 250 (the only usable Gemini account).
SELECT count(keypool_assign('member-' || i, 'gemini')) FROM generate_series(1, 20) i;
SELECT pool, keys_usable, daily_capacity, overcommit FROM keypool_pool_stats WHERE pool = 'gemini';
SELECT alert_key, severity, message FROM keypool_alerts WHERE kind = 'pool_overcommitted';

-- Re-enabling what errors disabled: key 6 comes back, a key an operator disabled stays off.
SELECT keypool_disable_key(2, 'rotated out by ops');
SELECT try($$SELECT keypool_enable_keys('nope')$$);
SELECT keypool_enable_keys('gemini') AS enabled;
SELECT keypool_enable_keys() AS enabled_everywhere;
SELECT key_id, state, reason FROM keypool_keys WHERE key_id IN (2, 6) ORDER BY key_id;
SELECT kind, key_id, reason FROM keypool_events WHERE kind IN ('key_enabled', 'key_disabled') ORDER BY id;

-- Resetting usage: Gemini's accounts start again (minute, day, cooldown) and so do its users.
SELECT requests_today, cooling_until IS NOT NULL AS cooling FROM keypool_scopes WHERE provider = 'gemini' ORDER BY scope_id;
SELECT used_today FROM keypool_allocation('user-1', 'gemini');
SELECT try($$SELECT keypool_reset_usage('nope')$$);
SELECT keypool_reset_usage('gemini') AS accounts_reset;
SELECT requests_this_minute, requests_today, tokens_today, cooling_until IS NOT NULL AS cooling
  FROM keypool_scopes WHERE provider = 'gemini' ORDER BY scope_id;
SELECT used_today FROM keypool_allocation('user-1', 'gemini');
SELECT requests_today FROM keypool_scopes WHERE provider = 'xai' ORDER BY scope_id;
SELECT kind, pool, reason FROM keypool_events WHERE kind = 'usage_reset';
-- What cleared since the last check, and what is new.
SELECT keypool_check_alerts() AS raised;
SELECT kind, reason FROM keypool_events WHERE kind = 'alert_cleared' ORDER BY id;
SELECT alert_key FROM keypool_alerts ORDER BY alert_key;

-- The usage report, per key per day, with cost from the price table.
SELECT try($$SELECT * FROM keypool_usage_report('2026-03-05', '2026-03-01')$$);
SELECT try($$SELECT * FROM keypool_usage_report(NULL, '2026-03-01')$$);
SELECT try($$SELECT keypool_set_price('xai', NULL, -1, 0)$$);
SELECT keypool_set_price('xai', NULL, 0.20, 0.50);
SELECT keypool_set_price('gemini', 'gemini-2.5-flash', 0.30, 2.50, per_request => 0.001);
SELECT keypool_set_price('gemini', 'gemini-2.5-flash', 0.30, 2.50);
SELECT provider, model, input_per_million, output_per_million, per_request FROM keypool_prices ORDER BY provider;
SELECT keypool_flush() >= 0 AS flushed;
SELECT keypool_set_clock('2026-03-03 10:00:00+00');
SELECT keypool_settle(reservation_id, 200, prompt_tokens => 2000000, completion_tokens => 1000000) AS next_day
  FROM keypool_reserve('user-a', 'xai', 10);
SELECT keypool_flush() > 0 AS flushed;
SELECT day, pool, key_id, label, requests, prompt_tokens, completion_tokens, errors, estimated_cost
  FROM keypool_usage_report('2026-03-01', '2026-03-03') ORDER BY day, key_id;
SELECT count(*) AS rows_outside FROM keypool_usage_report('2026-03-04', '2026-03-10');

-- Event retention: the background drops events older than pg_keypool.event_retention.
UPDATE keypool.event SET at = keypool_now() - interval '31 days' WHERE kind = 'key_added';
SELECT keypool.maintain();
SELECT count(*) FILTER (WHERE kind = 'key_added') AS old_gone, count(*) > 0 AS others_kept FROM keypool_events;

-- Nothing is open to PUBLIC.
SELECT c.relname FROM pg_class c
 WHERE c.relname IN ('keypool_key_stats', 'keypool_alerts', 'keypool_health', 'keypool_prices')
   AND has_table_privilege('public', c.oid, 'SELECT');
SELECT p.proname FROM pg_proc p
 WHERE p.proname IN ('keypool_reset_usage', 'keypool_enable_keys', 'keypool_usage_report', 'keypool_set_price',
                     'keypool_check_alerts', 'keypool_worker_stopped')
   AND has_function_privilege('public', p.oid, 'EXECUTE');

\c keypool_regress
DROP DATABASE keypool_ops;

-- A scope serving two pools counts once in the installation's totals: each pool promises its
-- members the whole account (a pool's own figure), but daily users at the minimum share count
-- the account's 300 requests once (30 users, not 60).
CREATE DATABASE keypool_shared_scope;
\c keypool_shared_scope
SET client_min_messages = warning;
CREATE EXTENSION pg_keypool;
SELECT keypool_set_clock('2026-03-02 10:00:00+00');
SELECT keypool_create_pool('chat', min_share => 10) > 0 AS chat, keypool_create_pool('search', min_share => 10) > 0 AS search;
SELECT keypool_add_key('chat', 'gemini', 'AIza-shared-scope-key-1', 'gemini-2.5-flash', account => 'team', rpd => 300) > 0 AS chat_key,
       keypool_add_key('search', 'gemini', 'AIza-shared-scope-key-2', 'gemini-2.5-flash', account => 'team', rpd => 300) > 0 AS search_key;
SELECT count(DISTINCT scope_id) AS scopes FROM keypool_keys;
SELECT pool, daily_capacity FROM keypool_pool_stats ORDER BY pool;
SELECT requests_per_day, daily_users FROM keypool_health;
-- A grant says when it was charged (this database's clock); a refusal has no time. The grant is
-- one more open reservation (keypool_status counts the whole installation's).
CREATE TEMP TABLE open_before AS SELECT reservations_open FROM keypool_status();
SELECT granted, granted_at = keypool_now() AS charged_now FROM keypool_reserve('u', 'chat');
SELECT keypool_create_pool('empty') > 0 AS empty;
SELECT granted, error, granted_at FROM keypool_reserve('u', 'empty');
SELECT s.reservations_open - b.reservations_open AS opened FROM keypool_status() s, open_before b;
\c keypool_regress
DROP DATABASE keypool_shared_scope;
