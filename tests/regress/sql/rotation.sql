-- Rotating a key's secret in place (issue 15): same id, group number, account, limits, history
-- and users; reservations granted on the old secret settle normally.
SELECT keypool_create_pool('rot') > 0 AS created;
SELECT keypool_add_key('rot', 'openai', 'sk-rotate-old-0000000001', 'gpt-4o-mini', rpd => 100) AS k1 \gset
SELECT keypool_add_key('rot', 'openai', 'sk-rotate-other-00000002', 'gpt-4o-mini', rpd => 100) AS k2 \gset
SELECT count(keypool_assign('rot-user-' || i, 'rot')) AS assigned FROM generate_series(1, 4) i;
SELECT reservation_id AS open_one FROM keypool_reserve('rot-user-1', 'rot') \gset
SELECT label, group_no, users FROM keypool_keys WHERE key_id = :k1;
SELECT keypool_rotate_secret(:k1, 'sk-rotate-new-0000000003');
-- Same key, same group number and users; the new label.
SELECT key_id = :k1 AS same_id, label, group_no, users FROM keypool_keys WHERE key_id = :k1;
-- Reservations now hand out the new secret.
CREATE TEMP TABLE rotated AS
SELECT r.* FROM generate_series(1, 8) i, LATERAL keypool_reserve('rot-user-' || i, 'rot') r;
SELECT DISTINCT secret FROM rotated WHERE key_id = :k1;
-- The reservation granted before the rotation settles normally.
SELECT keypool_settle(:open_one, 200, 10, 10);
-- The account's use today stays the key's: the reservation from before the rotation and those
-- after it.
SELECT requests_today = 1 + (SELECT count(*) FROM rotated WHERE key_id = :k1) AS kept
  FROM keypool_key_stats WHERE key_id = :k1;
SELECT regexp_replace(reason, '[0-9]+', 'N', 'g') AS reason FROM keypool_events WHERE kind = 'key_rotated';
-- A secret another key of the pool holds is refused, without saying which key.
SELECT try(format('SELECT keypool_rotate_secret(%s, %L)', :k1, 'sk-rotate-other-00000002'));
-- Adding the old secret again makes a new key: it is no longer in the pool.
SELECT keypool_add_key('rot', 'openai', 'sk-rotate-old-0000000001', 'gpt-4o-mini') <> :k1 AS new_key;
-- Bad input changes nothing.
SELECT try(format('SELECT keypool_rotate_secret(%s, NULL)', :k1));
SELECT try(format('SELECT keypool_rotate_secret(%s, %L)', :k1, ''));
SELECT try($$SELECT keypool_rotate_secret(NULL, 'sk-x-000000000000000000')$$);
SELECT try($$SELECT keypool_rotate_secret(987654, 'sk-x-000000000000000000')$$);
SELECT label FROM keypool_keys WHERE key_id = :k1;
