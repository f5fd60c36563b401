-- pg_keypool demo: the three pools of seed 003 (ten Google AI Studio keys, each from its own
-- project), reservations granted and refused, outcomes, and the state in psql.
\set ON_ERROR_STOP on
\set QUIET on
\pset footer off
SET timezone = 'UTC';

\echo
\echo '== 1. Configuration: chat (keys 1-2), artifact (3-6), image (7-10), per-key RPM and RPD'
SELECT keypool_create_pool(name, description) AS pool_id, name
  FROM (VALUES ('chat', 'chat: gemini-2.5-flash'),
               ('artifact', 'generate-artifact and generate-artifact-fix: gemini-2.5-pro'),
               ('image', 'generate-image: gemini-2.5-flash-image')) v(name, description);
-- Fake keys shaped like real ones (GOOGLE_KEY_1 .. GOOGLE_KEY_10), pointed at the mock provider
-- (psql variable mock_url; no real provider is reachable here).
CREATE TEMP TABLE demo_key AS
SELECT i, 'AIzaSy' || substr(md5('GOOGLE_KEY_' || i), 1, 33) AS secret FROM generate_series(1, 10) i;
SELECT count(*) AS keys_added FROM (
    SELECT keypool_add_key('chat', 'gemini', secret, 'gemini-2.5-flash',
                           account => 'project-' || i, base_url => :'mock_url', rpm => 2, rpd => 50) FROM demo_key WHERE i BETWEEN 1 AND 2
    UNION ALL
    SELECT keypool_add_key('artifact', 'gemini', secret, 'gemini-2.5-pro',
                           account => 'project-' || i, base_url => :'mock_url', rpm => 2, rpd => 50) FROM demo_key WHERE i BETWEEN 3 AND 6
    UNION ALL
    SELECT keypool_add_key('image', 'gemini', secret, 'gemini-2.5-flash-image',
                           account => 'project-' || i, base_url => :'mock_url', rpm => 15, rpd => 1500) FROM demo_key WHERE i BETWEEN 7 AND 10
) added;
SELECT key_id, pool, model, account, label, state FROM keypool_keys ORDER BY key_id;

\echo
\echo '== 2. chat has 2 keys x 2 RPM: four reservations are granted, the fifth is refused with the exact wait'
SELECT n, (r).granted, (r).key_id, (r).key_label, (r).error, (r).retry_after_ms
  FROM (SELECT n, keypool_reserve('user-' || n, 'chat') AS r FROM generate_series(1, 5) n) s ORDER BY n;

\echo
\echo '== 3. A grant carries what the caller needs to make the call (the secret only ever appears here)'
SELECT granted, key_id, provider, model, base_url, secret FROM keypool_reserve('user-42', 'image');

\echo
\echo '== 4. artifact: 4 keys x 2 RPM = 8 per minute, spread round-robin'
SELECT (r).key_id, count(*) AS granted
  FROM (SELECT keypool_reserve('user-' || n, 'artifact') AS r FROM generate_series(1, 9) n) s
 WHERE (r).granted GROUP BY 1 ORDER BY 1;
SELECT granted, error, retry_after_ms FROM keypool_reserve('user-9', 'artifact');

\echo
\echo '== 5. Outcomes: a success settles the real token count; a 429 cools that project; a 401 disables the key'
SELECT reservation_id AS ok_id FROM keypool_reserve('user-1', 'image', 1500) \gset
SELECT keypool_settle(:ok_id, 200, prompt_tokens => 900, completion_tokens => 250) AS outcome;
SELECT reservation_id AS limited_id FROM keypool_reserve('user-2', 'image') \gset
SELECT keypool_settle(:limited_id, 429, retry_after_ms => 26000,
                      error_code => 'GenerateRequestsPerMinutePerProjectPerModel-FreeTier') AS outcome;
SELECT reservation_id AS bad_id FROM keypool_reserve('user-3', 'image') \gset
SELECT keypool_settle(:bad_id, 400, error_code => 'API_KEY_INVALID') AS outcome;
\echo 'the next eight image requests go to the two keys still usable, evenly:'
SELECT (r).key_id, (r).key_label, count(*) AS granted
  FROM (SELECT keypool_reserve('user-' || n, 'image') AS r FROM generate_series(1, 8) n) s
 WHERE (r).granted GROUP BY 1, 2 ORDER BY 1;

\echo
\echo '== 6. State: keys, and each project''s windows against its limits'
SELECT key_id, pool, label, state, reason, cooling_until IS NOT NULL AS cooling FROM keypool_keys ORDER BY key_id;
SELECT s.account, s.model, s.rpm, s.requests_this_minute AS rpm_used, s.rpd, s.requests_today AS rpd_used,
       s.tokens_today, s.day_resets_at
  FROM keypool_scopes s ORDER BY s.scope_id;

\echo
\echo '== 7. Users: each signup is assigned the least-loaded key (seed 004), and the pool''s daily'
\echo '      capacity is shared among users with a guaranteed minimum (seed 000)'
SELECT keypool_alter_pool('image', min_share => 500);
CREATE TABLE user_profiles (id bigint PRIMARY KEY, email text, api_key_group int);
CREATE TRIGGER assign_key BEFORE INSERT ON user_profiles
    FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('image', 'id', 'api_key_group');
INSERT INTO user_profiles (id, email) SELECT i, 'user' || i || '@example.com' FROM generate_series(1, 10) i;
SELECT id, email, api_key_group FROM user_profiles ORDER BY id;
SELECT keypool_set_user_weight('10', 'image', 4);
SELECT u AS user_id, a.allocated_today, a.used_today, a.remaining_today, a.warning_level
  FROM unnest(ARRAY['1', '10']) u, LATERAL keypool_allocation(u, 'image') a;
SELECT granted, key_id, remaining_today, allocated_today, warning_level FROM keypool_reserve('1', 'image');
SELECT pool, keys_usable, keys_cooling, keys_disabled, daily_capacity, used_today, members, share_per_user, overcommit
  FROM keypool_pool_stats ORDER BY pool_id;

\echo
\echo '== 8. History: usage per key per hour, and what changed'
SELECT keypool_flush() AS keys_flushed;
SELECT pool, key_id, label, requests, prompt_tokens, completion_tokens, success, errors FROM keypool_usage ORDER BY key_id;
SELECT kind, pool, key_id, label, reason FROM keypool_events WHERE kind <> 'key_added' ORDER BY id;

\echo
\echo '== 9. Trust: an application role may use the image pool only, and sees no secret at rest'
SET client_min_messages = warning;
DROP ROLE IF EXISTS demo_app;
RESET client_min_messages;
CREATE ROLE demo_app;
GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]), keypool_reserve(text, text, bigint, text[], bytea), keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint),
    keypool_release(bigint) TO demo_app;
SELECT keypool_grant('image', 'demo_app', 'use');
SELECT pool, grantee, privilege, granted_by FROM keypool_grants;
SET ROLE demo_app;
SELECT granted, key_id, key_label FROM keypool_reserve('user-7', 'image');
\echo 'another pool, or one that does not exist: the same refusal (SQLSTATE 42501)'
DO $$ BEGIN PERFORM keypool_reserve('user-7', 'artifact');
   EXCEPTION WHEN insufficient_privilege THEN RAISE NOTICE '%', SQLERRM; END $$;
DO $$ BEGIN PERFORM keypool_reserve('user-7', 'no-such-pool');
   EXCEPTION WHEN insufficient_privilege THEN RAISE NOTICE '%', SQLERRM; END $$;
RESET ROLE;
\echo 'the table holds sealed secrets only (XChaCha20-Poly1305 under the keyring''s master key):'
SELECT id AS key_id, label, sealed_with AS master_key, length(secret_sealed) AS sealed_bytes,
       encode(substring(secret_sealed FROM 30 FOR 12), 'hex') || '…' AS ciphertext
  FROM keypool.key ORDER BY id LIMIT 3;
SELECT key_no, fingerprint, secrets FROM keypool_master_keys;
SELECT current_setting('pg_keypool.master_key_file') AS keyring_file;
