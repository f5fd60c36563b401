-- Rate windows: rolling minute, calendar day in the scope's time zone, tokens reserved then
-- settled, release, key selection, and refusals. The clock is frozen per database
-- (keypool_set_clock) so that every retry_after_ms below is exact.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-01-07 12:00:00+00');

-- 3 requests per rolling minute.
SELECT keypool_create_pool('minute');
SELECT keypool_add_key('minute', 'openai', 'sk-minute-000000000001', rpm => 3);
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'minute');
SELECT keypool_set_clock('2030-01-07 12:00:20+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'minute');
SELECT keypool_set_clock('2030-01-07 12:00:40+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'minute');
SELECT keypool_set_clock('2030-01-07 12:00:50+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'minute');
-- retry_after_ms is exact: a millisecond early is still refused, on time is granted.
SELECT keypool_set_clock('2030-01-07 12:00:59.999+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'minute');
SELECT keypool_set_clock('2030-01-07 12:01:00+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'minute');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'minute');

-- No double burst across a minute boundary: a per-minute counter would grant 2 at 12:02:59.9
-- and 2 more at 12:03:00.0.
SELECT keypool_create_pool('boundary');
SELECT keypool_add_key('boundary', 'openai', 'sk-boundary-00000000001', rpm => 2);
SELECT keypool_set_clock('2030-01-07 12:02:59.9+00');
SELECT granted_of('boundary', 2);
SELECT keypool_set_clock('2030-01-07 12:03:00+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'boundary');

-- Tokens are reserved from the estimate and settled to the actual count.
SELECT keypool_create_pool('tokens');
SELECT keypool_add_key('tokens', 'openai', 'sk-tokens-000000000001', tpm => 1000);
SELECT keypool_set_clock('2030-01-07 13:00:00+00');
SELECT reservation_id AS big FROM keypool_reserve('u', 'tokens', 800) \gset
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'tokens', 300);
-- The call used 50 + 50 tokens: 700 come back at once.
SELECT keypool_settle(:big, 200, 50, 50);
SELECT reservation_id AS second FROM keypool_reserve('u', 'tokens', 300) \gset
SELECT s.requests_this_minute, s.tokens_this_minute
  FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'tokens';
-- An overrun is charged: this call used 900 tokens, not 300.
SELECT keypool_settle(:second, 200, 400, 500);
SELECT s.tokens_this_minute FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'tokens';
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'tokens', 1);
-- An estimate above every key's limit can never be granted: a caller mistake, not a refusal.
SELECT try($$SELECT keypool_reserve('u', 'tokens', 1001)$$);

-- Per-day limits follow the scope's calendar day. Gemini's resets at midnight Pacific.
SELECT keypool_create_pool('daily');
SELECT keypool_add_key('daily', 'gemini', 'AIzaSy-daily-0000000001', 'gemini-2.5-flash', rpd => 2);
SELECT keypool_set_clock('2030-01-08 07:58:00+00');  -- 23:58 on January 7 in Los Angeles
SELECT granted_of('daily', 2);
SELECT keypool_set_clock('2030-01-08 07:59:00+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'daily');
SELECT s.requests_today, s.day_resets_at FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'daily';
SELECT keypool_set_clock('2030-01-08 08:00:00+00');  -- midnight in Los Angeles
SELECT granted_of('daily', 3);
-- Other providers reset at midnight UTC unless told otherwise.
SELECT keypool_create_pool('daily_utc');
SELECT keypool_add_key('daily_utc', 'xai', 'xai-daily-key-0000000002', 'grok-4', rpd => 1);
SELECT keypool_add_key('daily_utc', 'openai', 'sk-daily-tokyo-00000003', rpd => 1, timezone => 'Asia/Tokyo');
SELECT keypool_set_clock('2030-01-08 14:59:30+00');  -- 23:59:30 in Tokyo
SELECT granted_of('daily_utc', 3);
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'daily_utc');
SELECT keypool_set_clock('2030-01-08 15:00:00+00');  -- midnight in Tokyo: only that key is back
SELECT granted_of('daily_utc', 2);
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'daily_utc');

-- A request counts even when the provider call failed: settling does not give it back.
SELECT keypool_create_pool('failed');
SELECT keypool_add_key('failed', 'openai', 'sk-failed-call-0000001', rpm => 1);
SELECT keypool_set_clock('2030-01-09 09:00:00+00');
SELECT keypool_settle((keypool_reserve('u', 'failed')).reservation_id, 500);
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'failed');

-- Releasing gives back the request and its estimate.
SELECT keypool_create_pool('release');
SELECT keypool_add_key('release', 'openai', 'sk-release-00000000001', rpm => 1, tpm => 500);
SELECT keypool_set_clock('2030-01-09 10:00:00+00');
SELECT reservation_id AS r FROM keypool_reserve('u', 'release', 400) \gset
SELECT granted, error FROM keypool_reserve('u', 'release');
SELECT keypool_release(:r);
SELECT s.requests_this_minute, s.tokens_this_minute FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'release';
SELECT granted FROM keypool_reserve('u', 'release', 500);

-- Selection is a round robin over the pool that skips keys without room.
SELECT keypool_create_pool('rr');
SELECT keypool_add_key('rr', 'openai', 'sk-rr-key-' || i || '-0000000000', rpm => 2) FROM generate_series(1, 3) i;
SELECT string_agg(key_id::text, ',' ORDER BY i) AS keys
  FROM (SELECT i, (keypool_reserve('user-' || i, 'rr')).key_id FROM generate_series(1, 6) i) s;
-- Every key is full: refused with the time until the first one frees up.
SELECT keypool_set_clock('2030-01-09 10:00:15+00');
SELECT granted, error, retry_after_ms FROM keypool_reserve('u', 'rr');
SELECT keypool_set_clock('2030-01-09 10:01:00+00');
SELECT granted_of('rr', 7);

-- No usable key at all.
SELECT keypool_create_pool('empty');
SELECT granted, reservation_id, key_id, secret, error, retry_after_ms FROM keypool_reserve('u', 'empty');
-- The default pool is called 'default'.
SELECT try($$SELECT keypool_reserve('u')$$);
SELECT keypool_create_pool('default');
SELECT keypool_add_key('default', 'ollama', 'ollama-local-000000001', 'llama3.1');
SELECT granted, provider, model, base_url, secret, key_label FROM keypool_reserve('u');

-- The test clock refuses what it cannot represent.
SELECT try($$SELECT keypool_set_clock('infinity')$$);
SELECT try($$SELECT keypool_set_clock('1900-01-01 00:00:00+00')$$);

-- Bad input: an error with its SQLSTATE, and nothing is charged.
SELECT try($$SELECT keypool_reserve(NULL, 'rr')$$);
SELECT try($$SELECT keypool_reserve('', 'rr')$$);
SELECT try($$SELECT keypool_reserve(repeat('u', 300), 'rr')$$);
SELECT try($$SELECT keypool_reserve('u', NULL)$$);
SELECT try($$SELECT keypool_reserve('u', 'no-such-pool')$$);
SELECT try($$SELECT keypool_reserve('u', 'rr', -1)$$);
SELECT try($$SELECT keypool_reserve('u', 'rr', NULL)$$);
SELECT try($$SELECT keypool_reserve('u', 'rr', 2000000000)$$);
SELECT sum(s.requests_this_minute) AS rr_requests
  FROM keypool_scopes s WHERE s.scope_id IN (SELECT scope_id FROM keypool_keys WHERE pool = 'rr');

SELECT abs(extract(epoch FROM keypool_set_clock(NULL) - now())) < 600 AS back_to_wall_time;
