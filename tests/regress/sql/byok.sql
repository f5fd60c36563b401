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
GRANT EXECUTE ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer)
    TO byok_app;
SELECT keypool_grant('byok', 'byok_app', 'use');
SET ROLE byok_app;
SELECT keypool_add_key('byok', 'openai', 'sk-byok-bob-000000000003', 'gpt-4o-mini', owner => 'bob') > 0 AS bob_added;
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-bob-000000000004', owner => 'bob', base_url => 'http://169.254.169.254/v1')$$);
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-shared-000000009')$$);
RESET ROLE;
SELECT keypool_revoke('byok', 'byok_app', 'use');
REVOKE ALL ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer)
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

-- Issue 25: own keys are bounded and contained.
-- Users' own keys never make a model name route to a pool.
SELECT keypool_add_key('byok', 'openai', 'sk-byok-carol-00000000010', 'carols-private-model', owner => 'carol') AS carol_key \gset
SELECT count(*) AS routes_carols_model FROM keypool_models() WHERE model = 'carols-private-model';
SELECT count(*) AS routes_shared_model FROM keypool_models() WHERE pool = 'byok' AND model = 'gpt-4o-mini';
-- At most pg_keypool.max_owned_keys_per_user (5) own keys per user and pool.
SELECT count(keypool_add_key('byok', 'openai', 'sk-byok-carol-cap-' || lpad(i::text, 8, '0'), owner => 'carol')) AS added
  FROM generate_series(1, 4) i;
SELECT try($$SELECT keypool_add_key('byok', 'openai', 'sk-byok-carol-cap-00000099', owner => 'carol')$$);
SELECT count(*) AS carols_keys FROM keypool_keys WHERE owner = 'carol';
-- Removing an own key takes its account and history with it: add/remove loops leave no rows.
SELECT count(*) AS scopes_before FROM keypool.scope \gset
SELECT keypool_remove_key(:carol_key) AS users_moved;
SELECT :scopes_before - count(*) AS scope_rows_freed FROM keypool.scope;
SELECT count(*) AS scopes_before FROM keypool.scope \gset
SELECT count(*) AS key_rows_before FROM keypool.key \gset
DO $$
BEGIN
    FOR i IN 1..20 LOOP
        PERFORM keypool_remove_key(keypool_add_key('byok', 'openai', 'sk-byok-loop-' || lpad(i::text, 12, '0'), owner => 'carol'));
    END LOOP;
END
$$;
SELECT count(*) - :scopes_before AS scope_rows_added, (SELECT count(*) FROM keypool.key) - :key_rows_before AS key_rows_added
  FROM keypool.scope;
SELECT count(*) AS carols_keys FROM keypool_keys WHERE owner = 'carol';

-- Users (roles that are not the pool's administrators) add own keys only of providers that
-- check keys, called only where an administrator configured that provider (where the pool's
-- shared keys of the provider are); administrators may add any.
CREATE ROLE byok_app2;
GRANT EXECUTE ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer)
    TO byok_app2;
SELECT keypool_grant('byok', 'byok_app2', 'use');
SET ROLE byok_app2;
SELECT try($$SELECT keypool_add_key('byok', 'ollama', NULL, 'llama3', owner => 'dave')$$);
SELECT try($$SELECT keypool_add_key('byok', 'ollama', 'made-up-secret-000001', 'llama3', owner => 'dave')$$);
SELECT try($$SELECT keypool_add_key('byok', 'openai_compatible', 'made-up-secret-000002', owner => 'dave')$$);
SELECT try($$SELECT keypool_add_key('byok', 'http', 'made-up-secret-000003', owner => 'dave')$$);
-- No shared key of that provider: no address an administrator configured.
SELECT try($$SELECT keypool_add_key('byok', 'gemini', 'AIza-byok-dave-0000000004', 'gemini-2.5-flash', owner => 'dave')$$);
SELECT keypool_add_key('byok', 'openai', 'sk-byok-dave-000000000005', 'gpt-4o-mini', owner => 'dave') AS dave_openai \gset
RESET ROLE;
SELECT provider, base_url = (SELECT base_url FROM keypool.key WHERE id = :shared_key) AS where_the_shared_key_is
  FROM keypool.key WHERE id = :dave_openai;
SELECT keypool_add_key('byok', 'ollama', NULL, 'llama3', base_url => 'http://gpu-box:11434', owner => 'dave') > 0 AS admin_added_keyless;
SELECT keypool_revoke('byok', 'byok_app2', 'use');
REVOKE ALL ON FUNCTION keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer)
    FROM byok_app2;
DROP ROLE byok_app2;

-- A 401 on a request whose shape the caller chose settles nothing until the key was checked:
-- then the plain code disables it (the provider rejected the key), `checked:` does not.
SELECT reservation_id AS r1 FROM keypool_reserve('user-1', 'byok') \gset
SELECT keypool_settle(:r1, 401, error_code => 'unchecked:invalid_api_key') AS first_answer;
SELECT state FROM keypool_keys WHERE key_id = :shared_key;
SELECT keypool_settle(:r1, 401, error_code => 'checked:invalid_api_key') AS after_the_key_passed;
SELECT state FROM keypool_keys WHERE key_id = :shared_key;
SELECT try(format('SELECT keypool_settle(%s, 200)', :r1));
SELECT reservation_id AS r2 FROM keypool_reserve('user-1', 'byok') \gset
SELECT keypool_settle(:r2, 429, error_code => 'unchecked:rate_limit_exceeded', retry_after_ms => 1) AS rate_limited_at_once;
SELECT keypool_set_clock('2030-11-04 12:06:00+00') IS NOT NULL AS a_minute_later;
SELECT reservation_id AS r3 FROM keypool_reserve('user-2', 'byok') \gset
SELECT keypool_settle(:r3, 403, error_code => 'unchecked:') AS forbidden;
SELECT keypool_settle(:r3, 403) AS after_the_key_failed;
SELECT state, reason FROM keypool_keys WHERE key_id = :shared_key;
SELECT try(format('SELECT keypool_settle(%s, 401, error_code => %L)', :r3, 'unchecked:x'));
SELECT keypool_enable_key(:shared_key);
-- A model the caller chose (the key names none; the worker adds `model:`): that model's day's
-- quota, or Gemini's FAILED_PRECONDITION, cools the account briefly, never for the day.
SELECT reservation_id AS r4 FROM keypool_reserve('user-3', 'byok') \gset
SELECT keypool_settle(:r4, 429, error_code => 'unchecked:model:GenerateRequestsPerDayPerProjectPerModel-FreeTier', retry_after_ms => 36000000) AS callers_models_day;
-- However long the provider asked to wait (10 hours): the default cooldown (60 s) at most.
SELECT cooling_until - keypool_now() AS cooling_for
  FROM keypool_scopes WHERE scope_id = (SELECT scope_id FROM keypool.key WHERE id = :shared_key);
SELECT keypool_set_clock('2030-11-04 12:07:00+00') IS NOT NULL AS a_minute_later;
SELECT reservation_id AS r5 FROM keypool_reserve('user-3', 'byok') \gset
SELECT keypool_settle(:r5, 400, error_code => 'unchecked:FAILED_PRECONDITION') AS unchecked_precondition;
SELECT keypool_set_clock('2030-11-04 12:08:00+00') IS NOT NULL AS a_minute_later;
SELECT reservation_id AS r6 FROM keypool_reserve('user-3', 'byok') \gset
SELECT keypool_settle(:r6, 400, error_code => 'model:FAILED_PRECONDITION') AS callers_model_precondition;
SELECT keypool_set_clock('2030-11-04 12:09:00+00') IS NOT NULL AS three_minutes_later;
SELECT state FROM keypool_keys WHERE key_id = :shared_key;
SELECT granted, key_id = :shared_key AS shared FROM keypool_reserve('user-3', 'byok');
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;
