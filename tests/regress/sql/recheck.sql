-- Keys a provider's answer disabled are handed to the workers for a check with the provider
-- (issue 28): after `after`, then when the last check said; an operator's disabling never.
SET timezone = 'UTC';
SELECT keypool_create_pool('rk_invalid') > 0 AS created;
SELECT keypool_create_pool('rk_billing') > 0 AS created;
SELECT keypool_create_pool('rk_parked') > 0 AS created;
SELECT keypool_add_key('rk_invalid', 'openai', 'sk-recheck-invalid-000001') AS invalid \gset
SELECT keypool_add_key('rk_billing', 'openai', 'sk-recheck-billing-000001', account => 'broke-co') AS billing \gset
SELECT keypool_add_key('rk_parked', 'openai', 'sk-recheck-parked-0000001') AS parked \gset
-- A 401 disables the first key, a billing answer the second one's account, an operator the third.
SELECT keypool_settle((keypool_reserve('u', 'rk_invalid')).reservation_id, 401, error_code => 'invalid_api_key') AS outcome;
SELECT keypool_settle((keypool_reserve('u', 'rk_billing')).reservation_id, 429, error_code => 'insufficient_quota') AS outcome;
SELECT keypool_disable_key(:parked, 'parked by an operator');
SELECT label, state FROM keypool_keys WHERE pool LIKE 'rk_%' ORDER BY key_id;
-- Not due before `after`; then the two a provider disabled, with what a check needs.
SELECT count(*) AS due_in_an_hour FROM keypool_recheck_due('1 hour');
SELECT key_id = :invalid AS is_invalid, key_id = :billing AS is_billing, provider, secret IS NOT NULL AS has_secret, rechecks
  FROM keypool_recheck_due('0 seconds') ORDER BY key_id;
-- Claimed: not handed out again for five minutes.
SELECT count(*) AS claimed_again FROM keypool_recheck_due('0 seconds');
-- Still rejected: checked again after next_check; accepted: enabled, with its account.
SELECT keypool_recheck_result(:invalid, false, 'HTTP 401 invalid_api_key', '1 hour');
SELECT keypool_recheck_result(:billing, true, 'HTTP 200');
SELECT label, state FROM keypool_keys WHERE pool LIKE 'rk_%' ORDER BY key_id;
SELECT account, reason FROM keypool_scopes WHERE account = 'broke-co';
SELECT k.label, e.reason FROM keypool_events e JOIN keypool_keys k USING (key_id)
 WHERE e.kind = 'key_rechecked' ORDER BY e.id;
SELECT rechecks, recheck_at > now() + interval '59 minutes' AS next_in_an_hour FROM keypool.key WHERE id = :invalid;
-- The accepted round counts too: should billing fail again at once, the next check waits twice
-- as long (the back-off is not started over by the provider's answer).
SELECT rechecks FROM keypool.key WHERE id = :billing;
-- A result without a live claim (the key was not handed out) changes nothing.
SELECT keypool_recheck_result(:invalid, true, 'HTTP 200');
SELECT state FROM keypool_keys WHERE key_id = :invalid;
-- A result for a key an operator disabled changes nothing.
SELECT keypool_recheck_result(:parked, true, 'HTTP 200');
SELECT label, state FROM keypool_keys WHERE key_id = :parked;
-- Bad input.
SELECT try($$SELECT keypool_recheck_due(NULL)$$);
SELECT try($$SELECT keypool_recheck_due('-1 second')$$);
SELECT try($$SELECT keypool_recheck_result(NULL, true)$$);
