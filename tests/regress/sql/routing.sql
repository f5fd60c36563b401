-- Routing by preference (issue 14): key priorities within a pool, fallback chains across pools.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-09-02 12:00:00+00');

-- Priorities: a free-tier key (priority 0, the default) before a paid one (priority 1).
SELECT keypool_create_pool('tiered') > 0 AS created;
SELECT keypool_add_key('tiered', 'gemini', 'AIzaSy-tiered-free-0000001', rpm => 10) AS free \gset
SELECT keypool_add_key('tiered', 'openai', 'sk-tiered-paid-000000001', rpm => 100, priority => 1) AS paid \gset
SELECT label, priority FROM keypool_keys WHERE pool = 'tiered' ORDER BY key_id;
-- The paid key receives nothing while the free key has room: 10 to the free key, then paid.
WITH r AS MATERIALIZED (SELECT i, keypool_reserve('user-' || i, 'tiered') AS r FROM generate_series(1, 14) i)
SELECT (r).key_label, count(*), min(i) AS first, max(i) AS last FROM r GROUP BY 1 ORDER BY 2 DESC;
-- New users are assigned to the best tier only, however loaded it is.
SELECT count(DISTINCT keypool_assign('member-' || i, 'tiered')) AS keys_assigned,
       bool_and(keypool_assign('member-' || i, 'tiered') = :free) AS all_on_free
  FROM generate_series(1, 6) i;
-- A member assigned to the free key still spills to the paid key when the free key is full.
SELECT granted, key_label FROM keypool_reserve('member-1', 'tiered');
-- Priorities change with keypool_alter_key: the paid key first now (a lower number wins).
SELECT keypool_alter_key(:paid, priority => -1);
SELECT label, priority FROM keypool_keys WHERE pool = 'tiered' ORDER BY key_id;
SELECT keypool_set_clock('2030-09-02 12:05:00+00');
SELECT key_label, count(*)
  FROM (SELECT (keypool_reserve('user-' || i, 'tiered')).key_label FROM generate_series(1, 5) i) r GROUP BY 1;
-- ... and new users follow the best tier.
SELECT keypool_assign('member-7', 'tiered') = :paid AS member_7_on_paid;
-- A disabled best tier hands new users to the next one.
SELECT keypool_disable_key(:paid, 'out of credit');
SELECT keypool_assign('member-8', 'tiered') = :free AS member_8_on_free;
SELECT keypool_enable_key(:paid);
-- keypool_alter_key: bad input changes nothing.
SELECT try($$SELECT keypool_alter_key(NULL, priority => 1)$$);
SELECT try($$SELECT keypool_alter_key(999999, priority => 1)$$);
SELECT try(format('SELECT keypool_alter_key(%s, priority => 1001)', :free));
SELECT try($$SELECT keypool_add_key('tiered', 'openai', 'sk-tiered-bad-0000000001', priority => -1001)$$);
SELECT label, priority FROM keypool_keys WHERE pool = 'tiered' ORDER BY key_id;
-- Adding a key again with a priority changes its priority.
SELECT keypool_add_key('tiered', 'gemini', 'AIzaSy-tiered-free-0000001', priority => -5) = :free AS same_key;
SELECT label, priority FROM keypool_keys WHERE pool = 'tiered' ORDER BY key_id;

-- Fallback chains: local first, the free tier next, paid last (seed 002). One request a minute
-- each, with the minute windows starting at different times so that their waits differ.
SELECT keypool_create_pool('fb_local') > 0 AS created;
SELECT keypool_create_pool('fb_gemini') > 0 AS created;
SELECT keypool_create_pool('fb_openai') > 0 AS created;
SELECT keypool_add_key('fb_local', 'openai_compatible', 'local-0000000000000001', 'llama3', rpm => 1,
                       base_url => 'http://127.0.0.1:11434/v1', tpm => 100) IS NOT NULL AS added;
SELECT keypool_add_key('fb_gemini', 'gemini', 'AIzaSy-fallback-00000001', rpm => 1) IS NOT NULL AS added;
SELECT keypool_add_key('fb_openai', 'openai', 'sk-fallback-openai-00001', rpm => 1) IS NOT NULL AS added;
SELECT keypool_set_fallbacks('fb_local', ARRAY['fb_gemini', 'fb_openai']);
-- A chain is flat: fb_gemini's own chain is not followed from fb_local.
SELECT keypool_set_fallbacks('fb_gemini', ARRAY['tiered']);
SELECT pool, fallbacks, fallback_on_quota FROM keypool_pool_stats WHERE pool LIKE 'fb_%' ORDER BY pool;
SELECT keypool_set_clock('2030-09-02 13:00:10+00');
SELECT granted, pool, provider FROM keypool_reserve('u', 'fb_openai');
SELECT keypool_set_clock('2030-09-02 13:00:20+00');
SELECT granted, pool, provider FROM keypool_reserve('u', 'fb_gemini', 0, ARRAY['fb_gemini']);
SELECT keypool_set_clock('2030-09-02 13:00:30+00');
-- local serves; then gemini and openai are exhausted: the refusal carries the smallest wait
-- (openai's, free at 13:01:10, 40 s away).
SELECT granted, pool, provider, error, retry_after_ms FROM keypool_reserve('u', 'fb_local');
SELECT granted, pool, provider, error, retry_after_ms FROM keypool_reserve('u', 'fb_local');
-- At 13:01:15 local and gemini are still exhausted: openai serves, in the same call.
SELECT keypool_set_clock('2030-09-02 13:01:15+00');
SELECT granted, pool, provider, key_label FROM keypool_reserve('u', 'fb_local');
-- At 13:01:25 gemini has room again.
SELECT keypool_set_clock('2030-09-02 13:01:25+00');
SELECT granted, pool, provider FROM keypool_reserve('u', 'fb_local');
SELECT pool, fell_through_today FROM keypool_pool_stats WHERE pool LIKE 'fb_%' ORDER BY pool;
-- within narrows the chain (the worker passes an API token's pools): gemini is skipped.
SELECT keypool_set_clock('2030-09-02 13:03:00+00');
SELECT granted, pool FROM keypool_reserve('u', 'fb_local');
SELECT granted, pool FROM keypool_reserve('u', 'fb_local', 0, ARRAY['fb_local', 'fb_openai']);
SELECT granted, pool, error FROM keypool_reserve('u', 'fb_local', 0, ARRAY['fb_local']);
-- ... and a pool it does not list cannot be asked for at all.
SELECT try($$SELECT keypool_reserve('u', 'fb_local', 0, ARRAY['fb_openai'])$$);
-- An estimate no key of the pool could ever take goes down the chain, and is an error only
-- when nothing in the chain can serve it.
SELECT keypool_set_clock('2030-09-02 13:05:00+00');
SELECT granted, pool FROM keypool_reserve('u', 'fb_local', 500);
SELECT try($$SELECT keypool_reserve('u', 'fb_local', 500, ARRAY['fb_local'])$$);
-- A pool with no usable key falls through too (NO_KEYS).
SELECT keypool_create_pool('fb_empty') > 0 AS created;
SELECT keypool_set_fallbacks('fb_empty', ARRAY['fb_openai']);
SELECT keypool_set_clock('2030-09-02 13:07:00+00');
SELECT granted, pool FROM keypool_reserve('u', 'fb_empty');
SELECT granted, pool, error FROM keypool_reserve('u', 'fb_empty');

-- A user's share is a promise per pool: QUOTA_EXCEEDED falls through only when asked.
SELECT keypool_create_pool('fb_share') > 0 AS created;
SELECT keypool_add_key('fb_share', 'openai', 'sk-fallback-share-00001', rpd => 4) IS NOT NULL AS added;
SELECT keypool_assign('sa', 'fb_share') > 0 AS a, keypool_assign('sb', 'fb_share') > 0 AS b;
SELECT keypool_set_fallbacks('fb_share', ARRAY['fb_openai']);
SELECT keypool_set_clock('2030-09-02 13:10:00+00');
SELECT allocated_today FROM keypool_allocation('sa', 'fb_share');
SELECT i, (r).granted, (r).pool, (r).error
  FROM (SELECT i, keypool_reserve('sa', 'fb_share') AS r FROM generate_series(1, 3) i) s ORDER BY i;
SELECT keypool_set_fallbacks('fb_share', ARRAY['fb_openai'], on_quota_exceeded => true);
SELECT granted, pool, error FROM keypool_reserve('sa', 'fb_share');
SELECT pool, fallbacks, fallback_on_quota FROM keypool_pool_stats WHERE pool = 'fb_share';

-- Bad chains are refused and change nothing.
SELECT try($$SELECT keypool_set_fallbacks('fb_local', ARRAY['fb_local'])$$);
SELECT try($$SELECT keypool_set_fallbacks('fb_local', ARRAY['fb_openai', 'fb_openai'])$$);
SELECT try($$SELECT keypool_set_fallbacks('fb_local', ARRAY['fb_openai', NULL])$$);
SELECT try($$SELECT keypool_set_fallbacks('fb_local', ARRAY['no_such_pool'])$$);
SELECT try($$SELECT keypool_set_fallbacks('fb_local', NULL)$$);
SELECT try($$SELECT keypool_set_fallbacks('fb_local', array_fill('fb_openai'::text, ARRAY[17]))$$);
SELECT try($$SELECT keypool_set_fallbacks('fb_local', ARRAY[repeat('x', 201)])$$);
SELECT try($$SELECT keypool_reserve('u', 'fb_local', 0, (SELECT array_agg('p' || i) FROM generate_series(1, 1025) i))$$);
SELECT pool, fallbacks FROM keypool_pool_stats WHERE pool = 'fb_local';
-- An empty chain removes it.
SELECT keypool_set_fallbacks('fb_empty', ARRAY[]::text[]);
SELECT pool, fallbacks FROM keypool_pool_stats WHERE pool = 'fb_empty';
SELECT granted, error FROM keypool_reserve('u', 'fb_empty');
SELECT kind, pool, reason FROM keypool_events WHERE kind IN ('fallbacks_set', 'key_altered') ORDER BY id;

-- Keyless keys (issue 14): local servers such as Ollama need no key. A keyless key is the
-- provider, base URL and model: adding it again finds it, two hosts are two keys.
SELECT keypool_create_pool('local') > 0 AS created;
SELECT keypool_add_key('local', 'ollama', NULL, 'llama3') AS ollama_1 \gset
SELECT keypool_add_key('local', 'ollama', NULL, 'llama3') = :ollama_1 AS same_key;
SELECT keypool_add_key('local', 'ollama', NULL, 'llama3', base_url => 'http://10.0.0.2:11434') <> :ollama_1 AS other_host;
SELECT keypool_add_key('local', 'ollama', NULL, 'qwen3') <> :ollama_1 AS other_model;
SELECT keypool_add_key('local', 'openai_compatible', NULL, 'mistral', base_url => 'http://127.0.0.1:8000/v1') IS NOT NULL AS vllm;
SELECT label, provider, model FROM keypool_keys WHERE pool = 'local' ORDER BY key_id;
-- The reservation carries no secret; the base URL says where to call.
SELECT granted, provider, base_url, secret IS NULL AS no_secret, key_label FROM keypool_reserve('u', 'local');
-- Providers that need a key refuse a NULL secret.
SELECT try($$SELECT keypool_add_key('local', 'openai', NULL)$$);
SELECT try($$SELECT keypool_add_key('local', 'ollama', '')$$);
-- The master key's rotation keeps keyless keys apart (their identity is not an empty secret).
SELECT keypool_rotate_master_key() > 0 AS rotated;
SELECT keypool_add_key('local', 'ollama', NULL, 'llama3') = :ollama_1 AS still_same_key;
SELECT count(*) AS keys FROM keypool_keys WHERE pool = 'local';

-- Links the caller may not use are skipped; setting a chain needs use on every link.
CREATE ROLE routing_app;
GRANT USAGE ON SCHEMA keypool TO routing_app;
GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]), keypool_set_fallbacks(text, text[], boolean)
    TO routing_app;
SELECT keypool_grant('fb_local', 'routing_app', 'admin');
SELECT keypool_grant('fb_openai', 'routing_app', 'use');
SELECT keypool_set_clock('2030-09-02 13:20:00+00');
SET ROLE routing_app;
SELECT granted, pool FROM keypool_reserve('u', 'fb_local');
SELECT granted, pool FROM keypool_reserve('u', 'fb_local');
SELECT try($$SELECT keypool_set_fallbacks('fb_local', ARRAY['fb_gemini'])$$);
SELECT try($$SELECT keypool_set_fallbacks('fb_local', ARRAY['no_such_pool'])$$);
RESET ROLE;
SELECT pool, fallbacks FROM keypool_pool_stats WHERE pool = 'fb_local';
SELECT keypool_revoke('fb_local', 'routing_app', 'admin');
SELECT keypool_revoke('fb_openai', 'routing_app', 'use');
REVOKE ALL ON FUNCTION keypool_reserve(text, text, bigint, text[]), keypool_set_fallbacks(text, text[], boolean)
    FROM routing_app;
REVOKE USAGE ON SCHEMA keypool FROM routing_app;
DROP ROLE routing_app;
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;
