-- Usage history: counters in shared memory are added to one row per key per hour.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-03-01 09:30:00+00');
SELECT keypool_create_pool('hist');
SELECT keypool_add_key('hist', 'openai', 'sk-hist-key-a-00000001', account => 'h-a');
SELECT keypool_add_key('hist', 'openai', 'sk-hist-key-b-00000002', account => 'h-b');
SELECT keypool_flush() >= 0 AS earlier_usage_flushed;
SELECT keypool_settle((keypool_reserve('u', 'hist', 100)).reservation_id, 200, 30, 70);
SELECT keypool_settle((keypool_reserve('u', 'hist', 100)).reservation_id, 200, 10, 20);
SELECT keypool_settle((keypool_reserve('u', 'hist', 100)).reservation_id, 429);
SELECT keypool_release((keypool_reserve('u', 'hist')).reservation_id);
SELECT keypool_flush();
SELECT hour, label, requests, released, prompt_tokens, completion_tokens, success, errors, rate_limited
  FROM keypool_usage WHERE pool = 'hist' ORDER BY key_id;
-- Nothing new: nothing written.
SELECT keypool_flush();
-- More usage in the same hour adds to the same row; the next hour gets its own.
SELECT keypool_settle((keypool_reserve('u', 'hist')).reservation_id, 500);
SELECT keypool_flush();
SELECT keypool_set_clock('2030-03-01 10:05:00+00');
SELECT keypool_settle((keypool_reserve('u', 'hist')).reservation_id, 200, 1, 1);
SELECT keypool_flush();
SELECT hour, label, requests, prompt_tokens, completion_tokens, success, errors, server_error
  FROM keypool_usage WHERE pool = 'hist' ORDER BY hour, key_id;
SELECT count(*) AS rows_in_history FROM keypool.usage_hourly u JOIN keypool_keys k USING (key_id) WHERE k.pool = 'hist';
SELECT abs(extract(epoch FROM keypool_set_clock(NULL) - now())) < 600 AS back_to_wall_time;
