-- Assigning users to keys (seed 004): least loaded, at signup in a trigger, in bulk for
-- existing users, rebalanced after keys change; and reservations that prefer the user's key.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_create_pool('grok');
SELECT array_agg(keypool_add_key('grok', 'xai', 'xai-grok-key-' || lpad(i::text, 2, '0') || '-zzzzzzzzzz', 'grok-4', rpm => 2)
                 ORDER BY i) AS key_ids
  FROM generate_series(1, 4) i \gset
SELECT key_id - (SELECT min(key_id) FROM keypool_keys WHERE pool = 'grok') + 1 AS n, group_no
  FROM keypool_keys WHERE pool = 'grok' ORDER BY key_id;

-- Least loaded, ties to the lowest id: a fresh pool fills round robin; idempotent.
CREATE TEMP VIEW grok_load AS
SELECT group_no, users FROM keypool_keys WHERE pool = 'grok' ORDER BY group_no;
SELECT u, keypool_assign(u, 'grok') - (SELECT min(key_id) FROM keypool_keys WHERE pool = 'grok') + 1 AS key_n
  FROM unnest(ARRAY['ann', 'bob', 'cy', 'dee', 'eve', 'ann', 'bob']) WITH ORDINALITY AS t(u, o) ORDER BY o;
SELECT * FROM grok_load;
SELECT try($$SELECT keypool_assign(NULL, 'grok')$$);
SELECT try($$SELECT keypool_assign('', 'grok')$$);
SELECT try($$SELECT keypool_assign('x', 'nope')$$);

-- Rolled back, in a transaction or a savepoint: the assignment and its count are gone.
BEGIN;
SELECT keypool_assign('rolled-back', 'grok') > 0 AS assigned;
ROLLBACK;
BEGIN;
SAVEPOINT s;
SELECT keypool_assign('saved-then-rolled-back', 'grok') > 0 AS assigned;
ROLLBACK TO SAVEPOINT s;
SELECT keypool_assign('kept', 'grok') > 0 AS assigned;
COMMIT;
SELECT user_id FROM keypool_members WHERE pool = 'grok' ORDER BY assigned_at, user_id;
SELECT * FROM grok_load;

-- Signup trigger: the new row's user is assigned and the key's group number written.
CREATE TABLE profiles_uuid (id uuid PRIMARY KEY, api_key_group int);
CREATE TRIGGER signup BEFORE INSERT ON profiles_uuid
    FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'id', 'api_key_group');
INSERT INTO profiles_uuid (id) VALUES ('00000000-0000-0000-0000-000000000001'), ('00000000-0000-0000-0000-000000000002');
SELECT id, api_key_group FROM profiles_uuid ORDER BY id;
SELECT user_id, group_no FROM keypool_members WHERE user_id LIKE '00000000-%' ORDER BY 1;
CREATE TABLE profiles_int (id bigint PRIMARY KEY, grp smallint);
CREATE TRIGGER signup BEFORE INSERT ON profiles_int
    FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'id', 'grp');
INSERT INTO profiles_int VALUES (42, NULL), (43, 99);
SELECT * FROM profiles_int ORDER BY id;
CREATE TABLE profiles_int4 (id integer PRIMARY KEY, grp bigint);
CREATE TRIGGER signup BEFORE INSERT ON profiles_int4
    FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'id', 'grp');
INSERT INTO profiles_int4 VALUES (700, NULL);
SELECT * FROM profiles_int4;
CREATE TABLE profiles_text (handle text, team int);
CREATE TRIGGER signup AFTER INSERT ON profiles_text
    FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'handle');
INSERT INTO profiles_text VALUES ('@zoe', 1);
SELECT user_id FROM keypool_members WHERE user_id = '@zoe';
SELECT * FROM grok_load;
-- Misuse is a clear error, and the row is not inserted.
CREATE TABLE profiles_bad (id int, born date, grp text);
CREATE TRIGGER t1 BEFORE INSERT ON profiles_bad FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok');
SELECT try($$INSERT INTO profiles_bad VALUES (1, NULL, NULL)$$);
DROP TRIGGER t1 ON profiles_bad;
CREATE TRIGGER t2 BEFORE INSERT ON profiles_bad FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'born');
SELECT try($$INSERT INTO profiles_bad VALUES (1, now(), NULL)$$);
DROP TRIGGER t2 ON profiles_bad;
CREATE TRIGGER t3 BEFORE INSERT ON profiles_bad FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'id', 'grp');
SELECT try($$INSERT INTO profiles_bad VALUES (1, NULL, NULL)$$);
DROP TRIGGER t3 ON profiles_bad;
CREATE TRIGGER t4 BEFORE INSERT ON profiles_bad FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'nope');
SELECT try($$INSERT INTO profiles_bad VALUES (1, NULL, NULL)$$);
DROP TRIGGER t4 ON profiles_bad;
CREATE TRIGGER t5 BEFORE INSERT ON profiles_bad FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'id');
SELECT try($$INSERT INTO profiles_bad VALUES (NULL, NULL, NULL)$$);
DROP TRIGGER t5 ON profiles_bad;
CREATE TRIGGER t6 BEFORE INSERT ON profiles_bad FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('no-such-pool', 'id');
SELECT try($$INSERT INTO profiles_bad VALUES (7, NULL, NULL)$$);
SELECT count(*) AS rows_inserted FROM profiles_bad;

-- Backfill: every existing user, balanced, in batches, idempotent; group numbers written.
CREATE TABLE legacy_users (uid integer PRIMARY KEY, api_key_group integer);
INSERT INTO legacy_users SELECT i, NULL FROM generate_series(1, 25) i;
SELECT keypool_backfill('legacy_users', 'uid', 'grok', 'api_key_group');
SELECT * FROM grok_load;
SELECT api_key_group, count(*) FROM legacy_users GROUP BY 1 ORDER BY 1;
SELECT keypool_backfill('legacy_users', 'uid', 'grok', 'api_key_group');
SELECT try($$SELECT keypool_backfill('legacy_users', 'nope', 'grok')$$);
SELECT try($$SELECT keypool_backfill('legacy_users', 'uid', 'grok', 'nope')$$);
SELECT try($$SELECT keypool_backfill('no_such_table', 'uid', 'grok')$$);

-- Two keys more: rebalancing moves the fewest users to even the load out.
SELECT keypool_add_key('grok', 'xai', 'xai-grok-key-' || i || '-zzzzzzzzzz', 'grok-4', rpm => 2) > 0 AS added
  FROM generate_series(5, 6) i;
SELECT sum(users) AS users, max(users) - min(users) AS spread_before FROM keypool_keys WHERE pool = 'grok';
SELECT keypool_rebalance('grok');
SELECT * FROM grok_load;
SELECT keypool_rebalance('grok');
-- Backfill brings group numbers written in the application's table up to date.
SELECT keypool_backfill('legacy_users', 'uid', 'grok', 'api_key_group');
SELECT count(*) AS stale_groups FROM legacy_users l
  JOIN keypool_members m ON m.pool = 'grok' AND m.user_id = l.uid::text
 WHERE l.api_key_group IS DISTINCT FROM m.group_no;

-- Removing a key reassigns its users; other keys keep their group numbers.
SELECT keypool_remove_key(k) AS moved FROM (SELECT (:'key_ids'::bigint[])[2] AS k) x;
SELECT * FROM grok_load;
SELECT count(*) AS members_on_removed_key FROM keypool_members m WHERE m.key_id = (:'key_ids'::bigint[])[2];
SELECT try(format('SELECT keypool_remove_key(%s)', (:'key_ids'::bigint[])[2]));
-- Adding its secret again brings it back, with its group number.
SELECT keypool_add_key('grok', 'xai', 'xai-grok-key-02-zzzzzzzzzz', 'grok-4') = (:'key_ids'::bigint[])[2] AS same_key;
SELECT * FROM grok_load;

-- Reservations prefer the user's key, and spill to others when it is full or disabled.
SELECT keypool_set_clock('2030-07-01 12:00:00+00');
SELECT keypool_assign('spill', 'grok') AS spill_key \gset
SELECT (r).key_id = :spill_key AS on_own_key
  FROM (SELECT keypool_reserve('spill', 'grok') AS r FROM generate_series(1, 2)) s;
-- Its key allows 2 a minute: the third goes elsewhere.
SELECT key_id <> :spill_key AS spilled, granted FROM keypool_reserve('spill', 'grok');
SELECT keypool_set_clock('2030-07-01 12:05:00+00');
SELECT keypool_disable_key(:spill_key, 'test');
SELECT key_id <> :spill_key AS spilled, granted FROM keypool_reserve('spill', 'grok');
SELECT keypool_enable_key(:spill_key);
SELECT key_id = :spill_key AS back_on_own_key FROM keypool_reserve('spill', 'grok');
SELECT abs(extract(epoch FROM keypool_set_clock(NULL) - now())) < 600 AS back_to_wall_time;

-- Members are read into the shared-memory cache at their first reservation (one lookup), then
-- found there.
SELECT keypool_assign('cached-1', 'grok') > 0 AS assigned;
CREATE TEMP TABLE cache_before AS SELECT hits, loads FROM keypool_member_memory;
SELECT granted FROM keypool_reserve('cached-1', 'grok');
SELECT granted FROM keypool_reserve('cached-1', 'grok');
SELECT m.loads - b.loads AS loads, m.hits - b.hits AS hits FROM keypool_member_memory m, cache_before b;
