-- Privileges per pool: use, read, admin (keypool_grant / keypool_revoke), who may settle what,
-- and what each role sees. Roles are cluster-wide: created here, dropped at the end.
DROP ROLE IF EXISTS regress_kp_app, regress_kp_app2, regress_kp_ops, regress_kp_admin, regress_kp_star,
    regress_kp_member;
CREATE ROLE regress_kp_app;
CREATE ROLE regress_kp_app2;
CREATE ROLE regress_kp_ops;
CREATE ROLE regress_kp_admin;
CREATE ROLE regress_kp_star;
-- A login role that inherits the app role's privileges.
CREATE ROLE regress_kp_member IN ROLE regress_kp_app;

-- EXECUTE on the functions is the first gate (README, "Roles"); the privileges on pools the second.
GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]), keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint),
    keypool_release(bigint), keypool_allocation(text, text), keypool_can_request(text, text), keypool_assign(text, text),
    keypool_submit(text, text, jsonb, interval, integer), keypool_result(bigint), keypool_models(),
    keypool_claim_requests(text, integer, interval), keypool_complete_request(bigint, text, text, jsonb, text, timestamptz),
    keypool_queue_wake_at()
    TO regress_kp_app, regress_kp_app2, regress_kp_ops, regress_kp_admin, regress_kp_star;
GRANT EXECUTE ON FUNCTION keypool_create_pool(text, text, integer, interval, boolean, text, double precision),
    keypool_add_key(text, text, text, text, text, integer, integer, bigint, bigint, text, text, integer, integer, text, integer),
    keypool_disable_key(bigint, text), keypool_enable_key(bigint), keypool_reset_usage(text),
    keypool_grant(text, regrole, text), keypool_revoke(text, regrole, text), keypool_key_credentials(bigint),
    keypool_usage_report(date, date), keypool_rotate_master_key(), keypool_check_alerts(), keypool_enable_keys(text)
    TO regress_kp_app, regress_kp_ops, regress_kp_admin, regress_kp_star;
GRANT SELECT ON keypool_keys, keypool_scopes, keypool_pool_stats, keypool_events, keypool_members, keypool_requests,
    keypool_grants, keypool_key_stats, keypool_queue_depth, keypool_master_keys
    TO regress_kp_app, regress_kp_app2, regress_kp_ops, regress_kp_admin, regress_kp_star;
GRANT EXECUTE ON FUNCTION keypool.scope_state(), keypool.key_state(), keypool.pool_state(), keypool_now()
    TO regress_kp_app, regress_kp_app2, regress_kp_ops, regress_kp_admin, regress_kp_star;

SELECT keypool_create_pool('priv_a');
SELECT keypool_create_pool('priv_b');
SELECT keypool_add_key('priv_a', 'openai', 'sk-proj-privilege-a-000001', rpm => 100, rpd => 1000);
SELECT keypool_add_key('priv_b', 'openai', 'sk-proj-privilege-b-000002', rpm => 100, rpd => 1000) AS b_key \gset
SELECT keypool_grant('priv_a', 'regress_kp_app');
SELECT keypool_grant('priv_a', 'regress_kp_app2', 'use');
SELECT keypool_grant('priv_a', 'regress_kp_ops', 'read');
SELECT keypool_grant('priv_a', 'regress_kp_admin', 'admin');
SELECT keypool_grant('*', 'regress_kp_star', 'admin');
-- Granting twice changes nothing; unknown privileges, pools and roles are refused.
SELECT keypool_grant('priv_a', 'regress_kp_app');
SELECT try($$SELECT keypool_grant('priv_a', 'regress_kp_app', 'own')$$);
SELECT try($$SELECT keypool_grant('priv_a', NULL)$$);
SELECT try($$SELECT keypool_grant('no_such_pool', 'regress_kp_app')$$);
SELECT try($$SELECT keypool_grant('priv_a', 'regress_kp_nobody')$$);
SELECT pool, grantee, privilege, granted_by FROM keypool_grants WHERE grantee::text LIKE 'regress_kp%' ORDER BY 1, 2, 3;

-- use: reserve in its pool; the same refusal for another pool and for one that does not exist.
SET ROLE regress_kp_app;
SELECT granted, key_label FROM keypool_reserve('u1', 'priv_a');
SELECT try($$SELECT keypool_reserve('u1', 'priv_b')$$);
SELECT try($$SELECT keypool_reserve('u1', 'no_such_pool')$$);
SELECT try($$SELECT keypool_allocation('u1', 'priv_b')$$);
SELECT try($$SELECT keypool_can_request('u1', 'priv_b')$$);
SELECT try($$SELECT keypool_assign('u1', 'priv_b')$$);
SELECT * FROM keypool_models() ORDER BY 1;
-- use is not read: the views show nothing of the pool; it administers nothing.
SELECT count(*) AS keys_seen FROM keypool_keys;
SELECT count(*) AS pools_seen FROM keypool_pool_stats;
SELECT try($$SELECT keypool_disable_key(1)$$) LIKE '42501 permission denied for key%' AS disable_refused;
SELECT try($$SELECT keypool_create_pool('priv_c')$$);
SELECT try($$SELECT keypool_add_key('priv_a', 'openai', 'sk-proj-privilege-a-000009')$$);
SELECT try($$SELECT keypool_reset_usage('priv_a')$$);
SELECT try($$SELECT keypool_reset_usage()$$);
SELECT try($$SELECT keypool_grant('priv_a', 'regress_kp_app2', 'admin')$$);
SELECT try($$SELECT keypool_rotate_master_key()$$);
SELECT try(format('SELECT * FROM keypool_key_credentials(%s)', :b_key)) LIKE '42501 permission denied for key%' AS credentials_refused;
SELECT try($$SELECT keypool_enable_keys('priv_a')$$);
-- Without admin anywhere, "every pool it administers" is none.
SELECT keypool_enable_keys() AS enabled_without_admin;
-- A role that inherits regress_kp_app's privileges holds them too.
SET ROLE regress_kp_member;
SELECT granted FROM keypool_reserve('u2', 'priv_a');
RESET ROLE;

-- Reservations have owners: another role (even with use on the pool) may neither settle nor
-- release one; the pool's administrator may.
SET ROLE regress_kp_app;
SELECT reservation_id AS rid FROM keypool_reserve('u3', 'priv_a') \gset
SET ROLE regress_kp_app2;
SELECT try(format('SELECT keypool_settle(%s, 200)', :rid)) AS other_role_settles;
SELECT try(format('SELECT keypool_release(%s)', :rid)) AS other_role_releases;
SELECT try(format('SELECT keypool_settle(%s, 401)', :rid)) AS other_role_disables;
SET ROLE regress_kp_admin;
SELECT keypool_settle(:rid, 200) AS admin_settles;
SET ROLE regress_kp_app;
SELECT try(format('SELECT keypool_settle(%s, 200)', :rid)) AS already_settled;
RESET ROLE;
SELECT state FROM keypool_keys WHERE pool = 'priv_a';

-- A cooldown asked for is capped by pg_keypool.max_cooldown (1 day): a week is not possible.
SELECT keypool_set_clock('2031-01-01 12:00:00+00') IS NOT NULL AS clock_set;
SET ROLE regress_kp_app;
SELECT reservation_id AS rid FROM keypool_reserve('u4', 'priv_a') \gset
SELECT keypool_settle(:rid, 429, retry_after_ms => 604800000) AS outcome;
RESET ROLE;
SELECT cooling_until - keypool_now() AS cooling_for FROM keypool_scopes
 WHERE scope_id = (SELECT scope_id FROM keypool_keys WHERE pool = 'priv_a');
SELECT keypool_reset_usage('priv_a');
SELECT keypool_set_clock(NULL) IS NOT NULL AS wall_time;

-- read: the pool's rows, and no others; no reservations.
SELECT keypool_flush() > 0 AS history_written;
SET ROLE regress_kp_ops;
SELECT pool, label FROM keypool_keys ORDER BY key_id;
SELECT pool FROM keypool_pool_stats ORDER BY 1;
SELECT count(*) AS scopes_seen FROM keypool_scopes;
SELECT DISTINCT pool FROM keypool_events WHERE pool IS NOT NULL ORDER BY 1;
SELECT try($$SELECT keypool_reserve('u1', 'priv_a')$$);
SELECT count(*) AS grants_seen FROM keypool_grants;
SELECT DISTINCT pool FROM keypool_usage_report(current_date - 1, current_date + 1);
RESET ROLE;

-- admin: its pool's keys and settings, grants on it; nothing of other pools.
SET ROLE regress_kp_admin;
SELECT keypool_add_key('priv_a', 'openai', 'sk-proj-privilege-a-000003') > 0 AS added;
SELECT keypool_disable_key(key_id, 'maintenance') FROM keypool_keys WHERE label = 'sk-proj-…0003';
SELECT provider, secret FROM keypool_key_credentials((SELECT min(key_id) FROM keypool_keys));
SELECT try(format('SELECT keypool_disable_key(%s)', :b_key)) LIKE '42501 permission denied for key%' AS other_pool_key_refused;
SELECT try($$SELECT keypool_disable_key(999999)$$) LIKE '42501 permission denied for key%' AS unknown_key_refused_alike;
SELECT try($$SELECT keypool_grant('*', 'regress_kp_app', 'use')$$);
SELECT keypool_grant('priv_a', 'regress_kp_ops', 'use');
SELECT keypool_revoke('priv_a', 'regress_kp_ops', 'use');
SELECT pool, grantee::text, privilege FROM keypool_grants ORDER BY 1, 2, 3;
SELECT count(*) AS master_keys_seen FROM keypool_master_keys;
RESET ROLE;

-- '*': every pool, present and future; a pool that does not exist is then reported as such.
SET ROLE regress_kp_star;
SELECT keypool_create_pool('priv_c') > 0 AS created;
SELECT keypool_add_key('priv_c', 'openai', 'sk-proj-privilege-c-000004') > 0 AS added;
SELECT granted FROM keypool_reserve('u1', 'priv_c');
SELECT try($$SELECT keypool_reserve('u1', 'no_such_pool')$$);
SELECT count(*) AS pools_seen FROM keypool_pool_stats WHERE pool LIKE 'priv_%';
SELECT count(*) AS master_keys_seen FROM keypool_master_keys;
RESET ROLE;

-- Revoking takes effect at once.
SELECT keypool_revoke('priv_a', 'regress_kp_app2');
SET ROLE regress_kp_app2;
SELECT try($$SELECT keypool_reserve('u1', 'priv_a')$$);
RESET ROLE;

-- Requests have owners: a role sees its own requests and results; the pool's administrators
-- see all of the pool's; others' do not exist for it.
SET ROLE regress_kp_app;
SELECT keypool_submit('u1', 'priv_a', '{"messages": [{"role": "user", "content": "hi"}]}') AS qid \gset
SELECT status FROM keypool_result(:qid);
SELECT count(*) AS own_requests FROM keypool_requests;
SELECT try($$SELECT keypool_submit('u1', 'priv_b', '{"messages": [{"role": "user", "content": "hi"}]}')$$);
-- Larger than pg_keypool.max_request_bytes (1 MiB): refused before it is read.
SELECT try(format($$SELECT keypool_submit('u1', 'priv_a', '{"messages": [{"role": "user", "content": "%s"}]}')$$,
                  repeat('x', 1100000)));
SET ROLE regress_kp_ops;
SELECT try(format('SELECT * FROM keypool_result(%s)', :qid)) AS others_result;
SELECT count(*) AS others_requests FROM keypool_requests;
SELECT pool, status, requests FROM keypool_queue_depth WHERE pool = 'priv_a';
SET ROLE regress_kp_admin;
SELECT status FROM keypool_result(:qid);
SELECT count(*) AS pool_requests FROM keypool_requests WHERE pool = 'priv_a';
-- A worker claims only requests of pools it may use, and completes only what it claimed.
SET ROLE regress_kp_ops;
SELECT count(*) AS claimed_without_use FROM keypool_claim_requests('w-ops', 10, '1 minute');
SET ROLE regress_kp_app;
SELECT count(*) AS claimed FROM keypool_claim_requests('w-app', 10, '1 minute');
SET ROLE regress_kp_admin;
SELECT keypool_complete_request(:qid, 'w-app', 'done', '{"ok": true}') AS completed_by_other_role;
SET ROLE regress_kp_app;
SELECT keypool_complete_request(:qid, 'w-app', 'done', '{"ok": true}') AS completed;
SELECT status, response FROM keypool_result(:qid);
-- Heartbeats of a worker id belong to the role that reported them first.
RESET ROLE;
GRANT EXECUTE ON FUNCTION keypool_worker_heartbeat(text, text, text, integer, timestamptz, bigint, bigint, bigint),
    keypool_worker_stopped(text) TO regress_kp_app, regress_kp_admin;
GRANT SELECT ON keypool_workers TO regress_kp_app, regress_kp_admin;
SET ROLE regress_kp_app;
SELECT keypool_worker_heartbeat('w-app', '0.2.0', 'host-a', 1, now(), 1, 0, 1);
SELECT id, host FROM keypool_workers;
SET ROLE regress_kp_admin;
SELECT try($$SELECT keypool_worker_heartbeat('w-app', '0.2.0', 'host-b', 2, now(), 0, 0, 0)$$);
SELECT try($$SELECT keypool_worker_stopped('w-app')$$);
SELECT count(*) AS others_workers_seen FROM keypool_workers;
RESET ROLE;
SELECT id, host, role, stopped_at IS NULL AS running FROM keypool_workers WHERE id = 'w-app';
DELETE FROM keypool.worker WHERE id = 'w-app';

-- The upkeep deletes finished requests older than pg_keypool.request_retention (7 days), and
-- grants to roles that were dropped.
INSERT INTO keypool.request (user_id, pool, request, max_attempts, deadline, status, finished_at, submitted_by)
VALUES ('old', 'priv_a', '{"messages": [{}]}', 1, now(), 'done', now() - interval '8 days', 'regress_kp_app'),
       ('recent', 'priv_a', '{"messages": [{}]}', 1, now(), 'failed', now() - interval '6 days', 'regress_kp_app');
CREATE ROLE regress_kp_gone;
SELECT keypool_grant('priv_a', 'regress_kp_gone', 'read');
DROP ROLE regress_kp_gone;
SELECT keypool.maintain();
SELECT user_id FROM keypool.request WHERE pool = 'priv_a' AND user_id IN ('old', 'recent') ORDER BY 1;
SELECT count(*) AS grants_of_dropped_roles FROM keypool.pool_grant g
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = g.grantee::oid);

-- Clean up: pools and roles.
DELETE FROM keypool.request WHERE pool LIKE 'priv_%';
DELETE FROM keypool.pool_grant WHERE grantee::text LIKE 'regress_kp%';
DROP OWNED BY regress_kp_app, regress_kp_app2, regress_kp_ops, regress_kp_admin, regress_kp_star, regress_kp_member;
DROP ROLE regress_kp_app, regress_kp_app2, regress_kp_ops, regress_kp_admin, regress_kp_star, regress_kp_member;
