-- Every backend caches the configuration; changes must reach it, including the session that
-- made them, and uncommitted or rolled-back changes must not leak.
SELECT keypool_create_pool('cache');
SELECT keypool_add_key('cache', 'openai', 'sk-cache-0000000000001') AS k \gset
SELECT granted FROM keypool_reserve('u', 'cache');
SELECT keypool_disable_key(:k, 'rotated by the operator');
SELECT granted, error FROM keypool_reserve('u', 'cache');
SELECT keypool_enable_key(:k);
SELECT granted, error FROM keypool_reserve('u', 'cache');
SELECT try($$SELECT keypool_disable_key(999999, 'x')$$);
SELECT try($$SELECT keypool_enable_key(NULL)$$);

-- Inside a transaction the session sees its own changes; after ROLLBACK they are gone.
BEGIN;
SELECT keypool_create_pool('tx') > 0 AS created;
SELECT keypool_add_key('tx', 'openai', 'sk-tx-00000000000000001') > 0 AS added;
SELECT granted FROM keypool_reserve('u', 'tx');
ROLLBACK;
SELECT try($$SELECT keypool_reserve('u', 'tx')$$);

-- Limits edited directly in the table take effect too.
SELECT keypool_set_clock('2030-04-01 00:00:00+00') IS NOT NULL AS clock_set;
SELECT granted_of('cache', 5);
UPDATE keypool.scope SET rpm = 2 WHERE id = (SELECT scope_id FROM keypool_keys WHERE key_id = :k);
SELECT keypool_set_clock('2030-04-01 00:05:00+00') IS NOT NULL AS clock_set;
SELECT granted_of('cache', 5);
SELECT abs(extract(epoch FROM keypool_set_clock(NULL) - now())) < 600 AS back_to_wall_time;
