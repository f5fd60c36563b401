-- Concurrency per key (issue 28): a self-hosted backend (an Ollama or vLLM box) takes only so
-- many requests at once. Open reservations count against a key's max_concurrent until they are
-- settled or released, or their lease ends; reserve skips a key at its limit.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-11-04 12:00:00+00');
SELECT keypool_create_pool('boxes') > 0 AS created;
SELECT keypool_add_key('boxes', 'ollama', NULL, 'llama3', base_url => 'http://gpu-a:11434',
                       max_concurrent => 2) AS box_a \gset
SELECT keypool_add_key('boxes', 'ollama', NULL, 'qwen3', base_url => 'http://gpu-b:11434',
                       max_concurrent => 1) AS box_b \gset
SELECT label, max_concurrent, open_reservations FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;

-- Four at once: two on box a, one on box b; the fourth is refused with a short wait (any open
-- reservation may be settled at any moment).
SELECT reservation_id AS r1, key_id AS k1 FROM keypool_reserve('u1', 'boxes') \gset
SELECT reservation_id AS r2, key_id AS k2 FROM keypool_reserve('u2', 'boxes') \gset
SELECT reservation_id AS r3, key_id AS k3 FROM keypool_reserve('u3', 'boxes') \gset
SELECT count(*) FILTER (WHERE k = :box_a) AS on_a, count(*) FILTER (WHERE k = :box_b) AS on_b
  FROM unnest(ARRAY[:k1, :k2, :k3]) k;
SELECT granted, error, retry_after_ms BETWEEN 1 AND 1000 AS short_wait FROM keypool_reserve('u4', 'boxes');
SELECT label, open_reservations FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;
-- The rate windows have room: only concurrency refused.
SELECT requests_this_minute FROM keypool_scopes s JOIN keypool_keys k USING (scope_id)
 WHERE k.pool = 'boxes' ORDER BY k.key_id;

-- Settling frees a place at once; so does releasing.
SELECT CASE :box_b WHEN :k1 THEN :r1 WHEN :k2 THEN :r2 ELSE :r3 END AS on_b,
       CASE :box_a WHEN :k1 THEN :r1 ELSE :r2 END AS first_on_a,
       CASE :box_a WHEN :k3 THEN :r3 ELSE :r2 END AS last_on_a \gset
SELECT keypool_settle(:first_on_a, 200, 10, 5) AS outcome;
SELECT granted, key_id = :box_a AS on_box_a FROM keypool_reserve('u4', 'boxes');
SELECT granted FROM keypool_reserve('u5', 'boxes');
SELECT keypool_release(:on_b);
SELECT granted, key_id = :box_b AS on_box_b FROM keypool_reserve('u5', 'boxes');
SELECT granted FROM keypool_reserve('u6', 'boxes');
SELECT label, open_reservations FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;

-- A reservation nobody settles stops counting when its lease ends (10 minutes by default;
-- counted at most a fifteenth of a lease, 40 s, longer, never shorter).
SELECT keypool_set_clock('2030-11-04 12:10:00+00');
SELECT label, open_reservations FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;
SELECT keypool_set_clock('2030-11-04 12:10:41+00');
SELECT label, open_reservations FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;
SELECT granted, key_id = :box_a AS on_box_a FROM keypool_reserve('u6', 'boxes');
-- Settling one that expired says so and takes nothing off the count.
SELECT try(format('SELECT keypool_settle(%s, 200, 10, 5)', :last_on_a));
SELECT label, open_reservations FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;

-- keypool_alter_key changes the limit (0 removes it) and says so in the events.
SELECT keypool_alter_key(:box_b, max_concurrent => 3);
SELECT keypool_alter_key(:box_a, max_concurrent => 0);
SELECT label, max_concurrent, open_reservations FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;
SELECT reason FROM keypool_events WHERE kind = 'key_altered' AND pool = 'boxes' ORDER BY id;
SELECT count(*) FILTER (WHERE (r).granted) AS granted
  FROM (SELECT keypool_reserve('v' || i, 'boxes') AS r FROM generate_series(1, 20) i) s;
-- Adding a key again with max_concurrent sets it.
SELECT keypool_add_key('boxes', 'ollama', NULL, 'llama3', base_url => 'http://gpu-a:11434',
                       max_concurrent => 4) = :box_a AS same_key;
SELECT label, max_concurrent FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;

-- Bad input changes nothing.
SELECT try($$SELECT keypool_add_key('boxes', 'ollama', NULL, 'phi4', base_url => 'http://gpu-c:11434', max_concurrent => 0)$$);
SELECT try(format('SELECT keypool_alter_key(%s, max_concurrent => -1)', :box_b));
SELECT label, max_concurrent FROM keypool_keys WHERE pool = 'boxes' ORDER BY key_id;
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;
