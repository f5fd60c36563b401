-- Users' own keys (issue 15, bring your own key): a key owned by a user serves that user only,
-- first, outside their share; it adds nothing to the pool's capacity or to others' shares.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-11-04 12:00:00+00');
SELECT keypool_create_pool('byok') > 0 AS created;
SELECT keypool_add_key('byok', 'openai', 'sk-byok-shared-000000001', 'gpt-4o-mini', rpd => 100) AS shared_key \gset
SELECT count(keypool_assign('user-' || i, 'byok')) AS members FROM generate_series(1, 4) i;
SELECT daily_capacity, share_per_user FROM keypool_pool_stats WHERE pool = 'byok';
-- Alice brings her own key (three requests a minute).
SELECT keypool_add_key('byok', 'openai', 'sk-byok-alice-0000000002', 'gpt-4o-mini', rpm => 3, owner => 'alice') AS alice_key \gset
SELECT label, owner, users FROM keypool_keys WHERE pool = 'byok' ORDER BY key_id;
-- Her key adds nothing to the pool's capacity or to anyone's share.
SELECT daily_capacity, share_per_user FROM keypool_pool_stats WHERE pool = 'byok';
-- 50 reservations by other users never get it.
SELECT count(*) FILTER (WHERE (r).key_id = :alice_key) AS on_alices_key, count(*) FILTER (WHERE (r).granted) AS granted
  FROM (SELECT keypool_reserve('user-' || (i % 4 + 1), 'byok') AS r FROM generate_series(1, 50) i) s;
-- Alice's reservations use her key first, and her share is untouched while it has room.
SELECT i, (r).key_id = :alice_key AS own, (r).remaining_today
  FROM (SELECT i, keypool_reserve('alice', 'byok') AS r FROM generate_series(1, 4) i) s ORDER BY i;
SELECT used_today, own_keys_requests_today FROM keypool_allocation('alice', 'byok');
SELECT used_today, own_keys_requests_today FROM keypool_allocation('user-1', 'byok');
-- With owner_fallback off, her own keys at their limits refuse her instead.
SELECT keypool_alter_pool('byok', owner_fallback => false);
SELECT granted, error, retry_after_ms FROM keypool_reserve('alice', 'byok');
SELECT keypool_alter_pool('byok', owner_fallback => true);
SELECT granted, key_id = :shared_key AS shared FROM keypool_reserve('alice', 'byok');

-- A secret already in the pool is refused without saying which key holds it; an owned key has
-- an account of its own.
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-shared-000000001', owner => 'bob')$$);
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-alice-0000000002', owner => 'bob')$$);
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-alice-0000000002')$$);
SELECT keypool_add_key('byok', 'openai', 'sk-byok-alice-0000000002', owner => 'alice') = :alice_key AS same_key;
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-bob-000000000003', account => 'acme', owner => 'bob')$$);
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-bob-000000000003', owner => '')$$);

-- A role with `use` adds a user's own key (a service acting for the user), at the provider's
-- address only; shared keys still need `admin`.
CREATE ROLE byok_app;
GRANT EXECUTE ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text)
    TO byok_app;
SELECT keypool_grant('byok', 'byok_app', 'use');
SET ROLE byok_app;
SELECT keypool_add_key('byok', 'openai', 'sk-byok-bob-000000000003', 'gpt-4o-mini', owner => 'bob') > 0 AS bob_added;
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-bob-000000000004', owner => 'bob', base_url => 'http://169.254.169.254/v1')$$);
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-shared-000000009')$$);
RESET ROLE;
SELECT keypool_revoke('byok', 'byok_app', 'use');
REVOKE ALL ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text)
    FROM byok_app;
DROP ROLE byok_app;
SELECT label, owner FROM keypool_keys WHERE pool = 'byok' ORDER BY key_id;
SELECT granted, key_label FROM keypool_reserve('bob', 'byok');

-- Removing a user's key moves nobody and frees nothing else; she is back on the shared keys.
SELECT keypool_remove_key(:alice_key) AS users_moved;
SELECT keypool_set_clock('2030-11-04 12:05:00+00');
SELECT granted, key_id = :shared_key AS shared FROM keypool_reserve('alice', 'byok');
SELECT used_today, own_keys_requests_today FROM keypool_allocation('alice', 'byok');
SELECT kind, reason FROM keypool_events WHERE kind = 'key_added' AND reason IS NOT NULL ORDER BY id;
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;
