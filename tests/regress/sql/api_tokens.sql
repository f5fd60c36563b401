-- API tokens for keypool-worker's callers: made once (only their SHA-256 kept), bound to a user
-- and to pools, made and revoked by administrators of those pools, authenticated by one
-- function; and the outcome rule for answers on the worker's proxy route.
DROP ROLE IF EXISTS regress_kt_admin, regress_kt_user, regress_kt_worker;
CREATE ROLE regress_kt_admin;
CREATE ROLE regress_kt_user;
CREATE ROLE regress_kt_worker;
GRANT EXECUTE ON FUNCTION keypool_create_api_token(text, text, text[], timestamptz, integer, bigint, integer, integer),
    keypool_revoke_api_token(bigint) TO regress_kt_admin, regress_kt_user;
GRANT SELECT ON keypool_api_tokens TO regress_kt_admin, regress_kt_user;
-- The worker's role: the authentication function, nothing else of the tokens.
GRANT EXECUTE ON FUNCTION keypool_authenticate_api_token(text) TO regress_kt_worker;

SELECT keypool_create_pool('tok_a') > 0 AS created;
SELECT keypool_create_pool('tok_b') > 0 AS created;
SELECT keypool_grant('tok_a', 'regress_kt_admin', 'admin');
SELECT keypool_grant('tok_a', 'regress_kt_user', 'use');

-- A token: the prefix and 43 characters of base64url, different every time.
SELECT keypool_create_api_token('alice', 'alice', ARRAY['tok_a']) AS alice \gset
SELECT keypool_create_api_token('anyone') AS anyone \gset
SELECT :'alice' ~ '^kpt_[A-Za-z0-9_-]{43}$' AS well_formed, :'alice' <> :'anyone' AS distinct_tokens;
-- Only its SHA-256 is stored; the view shows neither.
SELECT count(*) AS stored_in_clear FROM keypool.api_token WHERE token_sha256 = convert_to(:'alice', 'UTF8')
    OR encode(token_sha256, 'escape') LIKE '%' || :'alice' || '%';
SELECT count(*) AS hashes_match FROM keypool.api_token WHERE token_sha256 = sha256(convert_to(:'alice', 'UTF8'));
SELECT attname FROM pg_attribute WHERE attrelid = 'keypool_api_tokens'::regclass AND attnum > 0 ORDER BY attnum;
SELECT label, user_id, pools, last_used_at IS NULL AS unused, expires_at, revoked_at FROM keypool_api_tokens ORDER BY id;

-- Authentication: the token's user and pools; nothing for anything else.
SELECT user_id, pools, expires_at FROM keypool_authenticate_api_token(:'alice');
SELECT user_id, pools FROM keypool_authenticate_api_token(:'anyone');
SELECT count(*) AS unknown FROM keypool_authenticate_api_token('kpt_' || repeat('A', 43));
SELECT count(*) AS not_a_token FROM keypool_authenticate_api_token('sk-proj-whatever');
SELECT count(*) AS too_long FROM keypool_authenticate_api_token('kpt_' || repeat('A', 100000));
SELECT count(*) AS null_token FROM keypool_authenticate_api_token(NULL);
SELECT last_used_at IS NOT NULL AS used FROM keypool_api_tokens WHERE label = 'alice';

-- A look-alike of sha256 planted where a careless search_path would find it first.
CREATE FUNCTION public.sha256(bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT token_sha256 FROM keypool.api_token LIMIT 1 $$;
SET search_path = public, pg_catalog;
SELECT count(*) AS forged FROM keypool_authenticate_api_token('kpt_' || repeat('B', 43));
RESET search_path;
DROP FUNCTION public.sha256(bytea);

-- The worker asks with the token's SHA-256, so that no token reaches a log; the digest of an
-- unknown token, or something that is not a digest, finds nothing.
SELECT user_id, pools FROM keypool_authenticate_api_token_sha256(pg_catalog.sha256(convert_to(:'alice', 'UTF8')));
SELECT count(*) AS unknown_digest FROM keypool_authenticate_api_token_sha256(pg_catalog.sha256('kpt_nothing'::bytea));
SELECT count(*) AS not_a_digest FROM keypool_authenticate_api_token_sha256('\x0102'::bytea);
SELECT count(*) AS null_digest FROM keypool_authenticate_api_token_sha256(NULL);

-- The worker's role authenticates, and reads nothing else.
GRANT EXECUTE ON FUNCTION keypool_authenticate_api_token_sha256(bytea) TO regress_kt_worker;
SET ROLE regress_kt_worker;
SELECT user_id FROM keypool_authenticate_api_token(:'alice');
SELECT user_id FROM keypool_authenticate_api_token_sha256(pg_catalog.sha256(convert_to(:'alice', 'UTF8')));
SELECT try($$SELECT * FROM keypool.api_token$$);
SELECT try($$SELECT * FROM keypool_api_tokens$$);
SELECT try($$SELECT keypool_create_api_token('mine')$$);
RESET ROLE;

-- Making tokens takes admin on every pool listed (on '*' for a token bound to none).
SET ROLE regress_kt_admin;
SELECT keypool_create_api_token('bob', 'bob', ARRAY['tok_a']) ~ '^kpt_' AS made;
SELECT try($$SELECT keypool_create_api_token('both', NULL, ARRAY['tok_a', 'tok_b'])$$);
SELECT try($$SELECT keypool_create_api_token('unbound')$$);
SELECT try($$SELECT keypool_create_api_token('ghost', NULL, ARRAY['no_such_pool'])$$);
RESET ROLE;
SET ROLE regress_kt_user;
SELECT try($$SELECT keypool_create_api_token('self-made', NULL, ARRAY['tok_a'])$$);
RESET ROLE;

-- Bad input is refused and changes nothing.
SELECT count(*) AS before FROM keypool.api_token \gset
SELECT try($$SELECT keypool_create_api_token(NULL)$$);
SELECT try($$SELECT keypool_create_api_token('  ')$$);
SELECT try($$SELECT keypool_create_api_token(repeat('x', 201))$$);
SELECT try($$SELECT keypool_create_api_token('empty', NULL, ARRAY[]::text[])$$);
SELECT try($$SELECT keypool_create_api_token('null pool', NULL, ARRAY[NULL]::text[])$$);
SELECT try($$SELECT keypool_create_api_token('no user', '')$$);
SELECT try($$SELECT keypool_create_api_token('long user', repeat('u', 300))$$);
SELECT try($$SELECT keypool_create_api_token('past', expires_at => now() - interval '1 second')$$);
SELECT try($$SELECT keypool_create_api_token('never', expires_at => 'infinity')$$);
SELECT count(*) - :before AS made FROM keypool.api_token;

-- Revocation: by the role that made the token, or an administrator of its pools; others learn
-- nothing (the same refusal for a token that does not exist).
SELECT id AS bob_id FROM keypool_api_tokens WHERE label = 'bob' \gset
SELECT id AS anyone_id FROM keypool_api_tokens WHERE label = 'anyone' \gset
SET ROLE regress_kt_user;
SELECT try(format('SELECT keypool_revoke_api_token(%s)', :bob_id));
SELECT try($$SELECT keypool_revoke_api_token(999999)$$);
SELECT try(format('SELECT keypool_revoke_api_token(%s)', :anyone_id));
RESET ROLE;
SET ROLE regress_kt_admin;
SELECT try(format('SELECT keypool_revoke_api_token(%s)', :anyone_id));
SELECT keypool_revoke_api_token(:bob_id);
RESET ROLE;
SELECT try($$SELECT keypool_revoke_api_token(999999)$$);
SELECT try($$SELECT keypool_revoke_api_token(NULL)$$);
SELECT keypool_revoke_api_token(id) FROM keypool_api_tokens WHERE label = 'alice';
SELECT count(*) AS revoked_alice FROM keypool_authenticate_api_token(:'alice');
SELECT label, revoked_at IS NOT NULL AS revoked FROM keypool_api_tokens ORDER BY id;
-- Revoking twice is harmless.
SELECT keypool_revoke_api_token(id) FROM keypool_api_tokens WHERE label = 'alice';
SELECT kind, reason FROM keypool_events WHERE kind = 'api_token_created' ORDER BY id;

-- Limits on a token (issue 28), across pools and workers: the worker names the token by its
-- SHA-256 in the five-argument keypool_reserve. The test clock stands still.
SET timezone = 'UTC';
SELECT keypool_set_clock('2030-11-06 23:58:00+00');
SELECT keypool_add_key('tok_a', 'openai', 'sk-tok-a-limits-00000000001', rpm => 1000) > 0 AS added;
SELECT keypool_add_key('tok_b', 'openai', 'sk-tok-b-limits-00000000001', rpm => 1000) > 0 AS added;
SELECT keypool_create_api_token('agent', pools => ARRAY['tok_a', 'tok_b'], rpm => 5, tpm => 1000, rpd => 7,
                                max_concurrent => 2) AS agent \gset
SELECT keypool_create_api_token('other', pools => ARRAY['tok_a']) AS other \gset
SELECT label, rpm, tpm, rpd, max_concurrent FROM keypool_api_tokens WHERE label IN ('agent', 'other') ORDER BY id;
SELECT sha256(convert_to(:'agent', 'UTF8')) AS agent_sha \gset
SELECT sha256(convert_to(:'other', 'UTF8')) AS other_sha \gset
-- Two open at once, in either pool; the third waits (at most a second).
SELECT reservation_id AS t1 FROM keypool_reserve('u1', 'tok_a', 10, NULL, :'agent_sha') \gset
SELECT reservation_id AS t2 FROM keypool_reserve('u2', 'tok_b', 10, NULL, :'agent_sha') \gset
SELECT granted, error, retry_after_ms FROM keypool_reserve('u3', 'tok_a', 10, NULL, :'agent_sha');
-- Another token, the same pool: not held back.
SELECT granted FROM keypool_reserve('u3', 'tok_a', 10, NULL, :'other_sha');
SELECT keypool_settle(:t1, 200, 5, 5) AS outcome;
SELECT keypool_release(:t2);
-- Five a minute, whatever the users and pools: one settled, four more, then the exact wait.
SELECT count(keypool_settle((keypool_reserve('u' || i, CASE WHEN i % 2 = 0 THEN 'tok_a' ELSE 'tok_b' END, 10, NULL, :'agent_sha')).reservation_id, 200, 5, 5)) AS settled
  FROM generate_series(1, 4) i;
SELECT granted, error, retry_after_ms FROM keypool_reserve('u9', 'tok_a', 10, NULL, :'agent_sha');
-- Seven a day (UTC): two more 90 s later, then the wait until midnight (30 s).
SELECT keypool_set_clock('2030-11-06 23:59:30+00');
SELECT count(keypool_settle((keypool_reserve('u' || i, 'tok_a', 10, NULL, :'agent_sha')).reservation_id, 200, 5, 5)) AS settled
  FROM generate_series(1, 2) i;
SELECT granted, error, retry_after_ms FROM keypool_reserve('u9', 'tok_a', 10, NULL, :'agent_sha');
SELECT keypool_set_clock('2030-11-07 00:00:00+00');
SELECT granted FROM keypool_reserve('u9', 'tok_a', 10, NULL, :'agent_sha');
-- Limits change at once (0: none); a revoked token reserves nothing.
SELECT keypool_alter_api_token(id, rpm => 0, max_concurrent => 0, rpd => 0, tpm => 0) FROM keypool_api_tokens WHERE label = 'agent';
SELECT count(*) FILTER (WHERE (keypool_reserve('u' || i, 'tok_a', 10, NULL, :'agent_sha')).granted) AS granted
  FROM generate_series(1, 10) i;
SELECT keypool_revoke_api_token(id) FROM keypool_api_tokens WHERE label = 'agent';
SELECT try(format('SELECT keypool_reserve(%L, %L, 10, NULL, %L::bytea)', 'u1', 'tok_a', :'agent_sha'));
SELECT try($$SELECT keypool_reserve('u1', 'tok_a', 10, NULL, '\x01'::bytea)$$);
-- Bad limits change nothing.
SELECT try($$SELECT keypool_create_api_token('bad', rpm => 0)$$);
SELECT try(format('SELECT keypool_alter_api_token(%s, rpm => -1)', (SELECT id FROM keypool_api_tokens WHERE label = 'other')));
SELECT label, rpm, tpm, rpd, max_concurrent FROM keypool_api_tokens WHERE label IN ('agent', 'other', 'bad') ORDER BY id;
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;

-- Answers on the worker's proxy route (error codes "proxy:..."): may cool an account for a
-- bounded time or trip a breaker, never disable a key or an account.
SELECT s.status, s.code, keypool_classify(s.status, s.code) AS outcome
  FROM (VALUES (401, 'proxy:'), (403, 'proxy:invalid_api_key'), (402, 'proxy:'), (429, 'proxy:insufficient_quota'),
               (429, 'proxy:GenerateRequestsPerDayPerProjectPerModel'), (429, 'proxy:'), (503, 'proxy:'),
               (404, 'proxy:not_found'), (200, 'proxy:'), (401, NULL), (403, 'insufficient_quota')) s(status, code);

DROP OWNED BY regress_kt_admin, regress_kt_user, regress_kt_worker;
DELETE FROM keypool.pool_grant WHERE grantee::text LIKE 'regress_kt%';
DROP ROLE regress_kt_admin, regress_kt_user, regress_kt_worker;
