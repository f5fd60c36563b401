-- What a provider's answer does: cooldowns, disabled keys and accounts, the circuit breaker,
-- and the errors of keypool_settle and keypool_release.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-02-01 10:00:00+00');
SELECT keypool_create_pool('out');
SELECT keypool_add_key('out', 'openai', 'sk-out-key-a-000000001', account => 'acct-a', rpm => 100);
SELECT keypool_add_key('out', 'openai', 'sk-out-key-b-000000002', account => 'acct-b', rpm => 100);

-- 429: the scope cools down for retry_after, and traffic moves to the other key.
SELECT reservation_id AS r, key_id AS key_a FROM keypool_reserve('u', 'out') \gset
SELECT reservation_id AS b1, key_id AS key_b FROM keypool_reserve('u', 'out') \gset
SELECT reservation_id AS b2 FROM keypool_reserve('u', 'out') \gset
SELECT keypool_settle(:r, 429, retry_after_ms => 30000, error_code => 'rate_limit_exceeded');
SELECT key_id, state, reason, cooling_until FROM keypool_keys WHERE pool = 'out' ORDER BY key_id;
SELECT string_agg(key_id::text, ',' ORDER BY i) = repeat(:key_b || ',', 3) || :key_b AS all_on_key_b
  FROM (SELECT i, (keypool_reserve('user-' || i, 'out')).key_id FROM generate_series(1, 4) i) s;
-- A cooldown only ever extends: a later, shorter retry-after does not shorten it.
SELECT keypool_settle(:b1, 429, retry_after_ms => 120000);
SELECT keypool_settle(:b2, 429, retry_after_ms => 5000);
SELECT key_id, state, cooling_until FROM keypool_keys WHERE pool = 'out' ORDER BY key_id;
-- Every key cools: refused with the time until the first comes back.
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'out');
SELECT keypool_set_clock('2030-02-01 10:00:30+00');
SELECT key_id = :key_a AS key_a_is_back FROM keypool_reserve('u', 'out');
-- Without a retry-after, the cooldown is pg_keypool.default_cooldown (60 s).
SELECT reservation_id AS r FROM keypool_reserve('u', 'out') \gset
SELECT keypool_settle(:r, 429);
SELECT cooling_until FROM keypool_keys WHERE key_id = :key_a;

-- Gemini's per-day quota: cool until the scope's next daily reset (midnight Pacific).
SELECT keypool_create_pool('gem');
SELECT keypool_add_key('gem', 'gemini', 'AIzaSy-gem-daily-00000001', 'gemini-2.5-flash', rpm => 10);
SELECT reservation_id AS r FROM keypool_reserve('u', 'gem') \gset
SELECT keypool_settle(:r, 429, retry_after_ms => 26000, error_code => 'GenerateRequestsPerDayPerProjectPerModel-FreeTier');
SELECT state, reason, cooling_until FROM keypool_keys WHERE pool = 'gem';

-- 401: the key is disabled with its reason, and never handed out again.
SELECT keypool_create_pool('auth');
SELECT keypool_add_key('auth', 'openai', 'sk-auth-key-a-00000001') AS auth_a \gset
SELECT keypool_add_key('auth', 'gemini', 'AIzaSy-auth-key-b-000002', 'gemini-2.5-flash') AS auth_b \gset
SELECT reservation_id AS r FROM keypool_reserve('u', 'auth') \gset
SELECT keypool_settle(:r, 401, error_code => 'invalid_api_key');
-- Gemini says the same with a 400 and API_KEY_INVALID.
SELECT reservation_id AS r FROM keypool_reserve('u', 'auth') \gset
SELECT keypool_settle(:r, 400, error_code => 'API_KEY_INVALID');
SELECT key_id, state, reason FROM keypool_keys WHERE pool = 'auth' ORDER BY key_id;
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'auth');
SELECT keypool_enable_key(:auth_a);
SELECT key_id = :auth_a AS enabled_key_is_used FROM keypool_reserve('u', 'auth');

-- Billing: the whole account is disabled, every key of it, until an operator acts.
SELECT keypool_create_pool('bill');
SELECT keypool_add_key('bill', 'openai', 'sk-bill-key-1-00000001', account => 'broke-org') AS bill_1 \gset
SELECT keypool_add_key('bill', 'openai', 'sk-bill-key-2-00000002', account => 'broke-org') AS bill_2 \gset
SELECT reservation_id AS r FROM keypool_reserve('u', 'bill') \gset
SELECT keypool_settle(:r, 429, error_code => 'insufficient_quota');
SELECT key_id, state, reason FROM keypool_keys WHERE pool = 'bill' ORDER BY key_id;
SELECT granted, error FROM keypool_reserve('u', 'bill');
SELECT keypool_enable_key(:bill_2);
SELECT key_id, state FROM keypool_keys WHERE pool = 'bill' ORDER BY key_id;

-- Caller errors and answers that are not the key's fault: no penalty.
SELECT keypool_create_pool('calm');
SELECT keypool_add_key('calm', 'openai', 'sk-calm-key-0000000001');
SELECT reservation_id AS r FROM keypool_reserve('u', 'calm') \gset
SELECT keypool_settle(:r, 400, error_code => 'context_length_exceeded');
SELECT reservation_id AS r FROM keypool_reserve('u', 'calm') \gset
SELECT keypool_settle(:r, 413);
SELECT reservation_id AS r FROM keypool_reserve('u', 'calm') \gset
SELECT keypool_settle(:r, 403, error_code => 'unsupported_country_region_territory');
SELECT state, reason FROM keypool_keys WHERE pool = 'calm';

-- 5xx: counted; after 5 in a row (pg_keypool.breaker_threshold) the key leaves rotation for
-- 30 s (pg_keypool.breaker_cooldown), then one trial request decides.
SELECT keypool_create_pool('flaky');
SELECT keypool_add_key('flaky', 'anthropic', 'sk-ant-flaky-000000001', 'claude-sonnet-4');
SELECT keypool_settle((keypool_reserve('u', 'flaky')).reservation_id, s)
  FROM unnest(ARRAY[503, 500, 0, 529]) s;
SELECT state FROM keypool_keys WHERE pool = 'flaky';
SELECT keypool_settle((keypool_reserve('u', 'flaky')).reservation_id, 502);
SELECT state, reason, cooling_until FROM keypool_keys WHERE pool = 'flaky';
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'flaky');
SELECT keypool_set_clock('2030-02-01 10:01:00+00');
-- Half-open: exactly one trial goes through.
SELECT reservation_id AS trial FROM keypool_reserve('u', 'flaky') \gset
SELECT granted, error FROM keypool_reserve('u', 'flaky');
SELECT keypool_settle(:trial, 503);
SELECT state, cooling_until FROM keypool_keys WHERE pool = 'flaky';
SELECT keypool_set_clock('2030-02-01 10:01:30+00');
SELECT reservation_id AS trial FROM keypool_reserve('u', 'flaky') \gset
SELECT keypool_settle(:trial, 200, 10, 20);
SELECT state, reason FROM keypool_keys WHERE pool = 'flaky';
SELECT granted_of('flaky', 3);
-- Fewer than 5 in a row never trips it: a success resets the count.
SELECT keypool_settle((keypool_reserve('u', 'flaky')).reservation_id, s)
  FROM unnest(ARRAY[500, 500, 500, 500, 200, 500, 500, 500, 500]) s;
SELECT state FROM keypool_keys WHERE pool = 'flaky';

-- Errors of settle and release; none of them changes anything.
SELECT reservation_id AS r FROM keypool_reserve('u', 'calm') \gset
SELECT try(format('SELECT keypool_settle(%s, 200, -1)', :r));
SELECT try(format('SELECT keypool_settle(%s, 42)', :r));
SELECT try(format('SELECT keypool_settle(%s, NULL)', :r));
SELECT try(format('SELECT keypool_settle(%s, 429, retry_after_ms => -5)', :r));
SELECT try(format('SELECT keypool_settle(%s, 200, 1, 1, error_code => repeat(''x'', 300))', :r));
SELECT keypool_settle(:r, 200, 5, 5);
SELECT try(format('SELECT keypool_settle(%s, 200)', :r));
SELECT try(format('SELECT keypool_release(%s)', :r));
SELECT try($$SELECT keypool_settle(12345, 200)$$);
SELECT try($$SELECT keypool_settle(NULL, 200)$$);
SELECT try($$SELECT keypool_release(-1)$$);
SELECT reservation_id AS r FROM keypool_reserve('u', 'calm') \gset
SELECT keypool_release(:r);
SELECT try(format('SELECT keypool_release(%s)', :r));
-- A reservation neither settled nor released expires after the lease (600 s) and keeps its
-- estimate charged.
SELECT keypool_create_pool('lease');
SELECT keypool_add_key('lease', 'openai', 'sk-lease-key-000000001', tpd => 1000);
SELECT reservation_id AS r FROM keypool_reserve('u', 'lease', 700) \gset
SELECT keypool_set_clock('2030-02-01 10:12:00+00');
SELECT try(format('SELECT keypool_settle(%s, 200, 1, 1)', :r));
SELECT try(format('SELECT keypool_release(%s)', :r));
SELECT s.tokens_today FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'lease';

SELECT kind, pool, label, reason FROM keypool_events
 WHERE kind IN ('key_disabled', 'key_enabled', 'scope_disabled') ORDER BY id;
SELECT abs(extract(epoch FROM keypool_set_clock(NULL) - now())) < 600 AS back_to_wall_time;

-- A half-open breaker's trial is given back when the scope has no room for it, so the key
-- is not stuck waiting for a trial that never happened.
SELECT keypool_set_clock('2030-02-02 10:00:00+00');
SELECT keypool_create_pool('trial');
SELECT keypool_add_key('trial', 'openai', 'sk-trial-key-00000001', rpm => 5);
SELECT keypool_settle((keypool_reserve('u', 'trial')).reservation_id, 503) FROM generate_series(1, 5);
SELECT keypool_set_clock('2030-02-02 10:00:31+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'trial');
SELECT keypool_set_clock('2030-02-02 10:01:00+00');
SELECT granted, error FROM keypool_reserve('u', 'trial');
SELECT abs(extract(epoch FROM keypool_set_clock(NULL) - now())) < 600 AS back_to_wall_time;
