-- The provider's own counters read back (issue 28): OpenAI, xAI and Anthropic answer with what
-- is left of a key's limits; keypool_settle takes it, and when the provider reports less room
-- than the extension counts (someone else uses the key, or its limits are set too high), the
-- key's scope is held to the provider's figure until it resets.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-11-08 09:00:00+00');
SELECT keypool_create_pool('shared_key') > 0 AS created;
SELECT keypool_add_key('shared_key', 'openai', 'sk-counters-leaked-000001', rpm => 100) AS leaked \gset
-- The first call's answer says: no request left for 20 s. Our own count has 99 left.
SELECT reservation_id AS r1 FROM keypool_reserve('u1', 'shared_key') \gset
SELECT keypool_settle(:r1, 200, 10, 5, remaining_requests => 0, requests_reset_ms => 20000) AS outcome;
SELECT requests_this_minute, rpm, provider_requests_left, provider_tokens_left, held_to_provider_until
  FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.key_id = :leaked;
-- No grant on that scope for 20 s, though the windows have room; then grants again.
SELECT granted, error, retry_after_ms FROM keypool_reserve('u2', 'shared_key');
-- While it holds, an alert says so; the hold's beginning is an event.
SELECT kind, severity, message FROM keypool_alerts WHERE kind = 'limit_mismatch';
SELECT reason FROM keypool_events WHERE kind = 'limit_mismatch' ORDER BY id;
SELECT keypool_set_clock('2030-11-08 09:00:19.999+00');
SELECT granted, retry_after_ms FROM keypool_reserve('u2', 'shared_key');
SELECT keypool_set_clock('2030-11-08 09:00:20+00');
SELECT granted FROM keypool_reserve('u2', 'shared_key');
SELECT count(*) AS alerts_after_the_reset FROM keypool_alerts WHERE kind = 'limit_mismatch';
-- A report of as much room as ours or more holds nothing; a report of a little room is spent
-- by the grants that follow (two requests left, 100 tokens: two of 40 tokens fit).
SELECT reservation_id AS r2 FROM keypool_reserve('u3', 'shared_key') \gset
SELECT keypool_settle(:r2, 200, 10, 5, remaining_requests => 500, requests_reset_ms => 1000) AS outcome;
SELECT provider_requests_left, held_to_provider_until FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.key_id = :leaked;
SELECT reservation_id AS r3 FROM keypool_reserve('u4', 'shared_key') \gset
SELECT keypool_settle(:r3, 200, 10, 5, remaining_requests => 2, requests_reset_ms => 30000,
                      remaining_tokens => 100, tokens_reset_ms => 30000) AS outcome;
SELECT count(*) FILTER (WHERE (keypool_reserve('u' || i, 'shared_key', 40)).granted) AS granted
  FROM generate_series(5, 9) i;
-- Both or neither, within bounds; bad input changes nothing.
SELECT keypool_set_clock('2030-11-08 09:01:00+00');
SELECT reservation_id AS r4 FROM keypool_reserve('u9', 'shared_key') \gset
SELECT try(format('SELECT keypool_settle(%s, 200, 1, 1, remaining_requests => 3)', :r4));
SELECT try(format('SELECT keypool_settle(%s, 200, 1, 1, remaining_requests => -1, requests_reset_ms => 10)', :r4));
SELECT keypool_settle(:r4, 200, 1, 1) AS still_open_then_settled;
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;
