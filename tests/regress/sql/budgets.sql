-- Spend budgets (issue 14): a pool's spend per day or month and each user's, held at
-- reservation from prices like tokens, replaced by the true cost at settle; exact decimals.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-10-07 12:00:00+00');

SELECT keypool_create_pool('spend') > 0 AS created;
SELECT keypool_add_key('spend', 'openai', 'sk-budget-spend-00000001', 'budget-model', rpm => 1000) IS NOT NULL AS added;
-- A budget needs a price for every usable key's model.
SELECT regexp_replace(try($$SELECT keypool_set_budget('spend', 1.00, 'day')$$), 'key [0-9]+', 'key N') AS try;
-- 1.00 per million input tokens, 2.00 per million output tokens: an estimate of 5,000 tokens
-- holds 5,000 x 2.00 / 1e6 = 0.01 (the dearer price: the worst case).
SELECT keypool_set_price('openai', 'budget-model', 1.00, 2.00);
SELECT keypool_set_budget('spend', 1.00, 'day');
SELECT pool, budget, budget_per_user, budget_period, spent, budget_resets_at, default_cost
  FROM keypool_pool_stats WHERE pool = 'spend';

-- A grant says what it holds of the budget (the worker caps the call's output at it);
-- releasing it gives the hold back.
SELECT budget_held, reservation_id AS held_id FROM keypool_reserve('user-1', 'spend', 5000) \gset
SELECT :'budget_held' AS budget_held, keypool_release(:held_id);
SELECT spent FROM keypool_pool_stats WHERE pool = 'spend';

-- 100 x 0.01 is exactly 1.00: the 101st reservation is refused until midnight (12 h).
CREATE TABLE spend_grants AS
SELECT i, (r).granted, (r).reservation_id, (r).error, (r).retry_after_ms
  FROM (SELECT i, keypool_reserve('user-' || (i % 7), 'spend', 5000) AS r FROM generate_series(1, 101) i) s;
SELECT count(*) FILTER (WHERE granted) AS granted, min(i) FILTER (WHERE NOT granted) AS first_refused,
       max(error) AS error, max(retry_after_ms) AS retry_after_ms
  FROM spend_grants;
SELECT spent FROM keypool_pool_stats WHERE pool = 'spend';

-- Settling replaces the estimate by the true cost: 1,000 in + 1,000 out cost 0.003, so ten
-- settles free 10 x 0.007 = 0.07, room for exactly 7 more reservations.
SELECT count(keypool_settle(reservation_id, 200, 1000, 1000)) AS settled
  FROM (SELECT reservation_id FROM spend_grants WHERE granted ORDER BY i LIMIT 10) s;
SELECT spent FROM keypool_pool_stats WHERE pool = 'spend';
SELECT count(*) FILTER (WHERE (r).granted) AS granted
  FROM (SELECT keypool_reserve('late', 'spend', 5000) AS r FROM generate_series(1, 8) i) s;
SELECT spent FROM keypool_pool_stats WHERE pool = 'spend';
-- Releasing gives the whole hold back; an overrun is charged in full.
SELECT keypool_release((SELECT reservation_id FROM spend_grants WHERE granted ORDER BY i DESC LIMIT 1));
SELECT spent FROM keypool_pool_stats WHERE pool = 'spend';
SELECT keypool_settle((SELECT reservation_id FROM spend_grants WHERE granted ORDER BY i DESC LIMIT 1 OFFSET 1), 200, 0, 20000);
SELECT spent FROM keypool_pool_stats WHERE pool = 'spend';
-- The period resets at midnight in the pool's time zone.
SELECT keypool_set_clock('2030-10-08 00:00:00+00');
SELECT granted, error FROM keypool_reserve('u', 'spend', 5000);
SELECT spent, budget_resets_at FROM keypool_pool_stats WHERE pool = 'spend';

-- Without a token estimate a reservation holds the pool's default cost.
SELECT keypool_alter_pool('spend', default_cost => 0.25);
SELECT granted FROM keypool_reserve('u', 'spend');
SELECT spent, default_cost FROM keypool_pool_stats WHERE pool = 'spend';

-- Per-user budgets: 0.02 each a day (two reservations of 0.01), the pool unlimited.
SELECT keypool_create_pool('per_user') > 0 AS created;
SELECT keypool_add_key('per_user', 'openai', 'sk-budget-user-000000001', 'budget-model') IS NOT NULL AS added;
SELECT keypool_set_budget('per_user', NULL, 'day', per_user => 0.02);
SELECT i, (r).granted, (r).error, (r).retry_after_ms
  FROM (SELECT i, keypool_reserve('alice', 'per_user', 5000) AS r FROM generate_series(1, 3) i) s ORDER BY i;
SELECT granted FROM keypool_reserve('bob', 'per_user', 5000);
SELECT spent, budget, budget_resets_at FROM keypool_allocation('alice', 'per_user');
SELECT spent, budget FROM keypool_allocation('carol', 'per_user');
-- Alice's budget is used up: not even a reservation without an estimate fits.
SELECT keypool_can_request('alice', 'per_user') AS alice_can, keypool_can_request('bob', 'per_user') AS bob_can;
SELECT granted, error FROM keypool_reserve('alice', 'per_user');
SELECT spent AS pool_spent, budget, budget_per_user FROM keypool_pool_stats WHERE pool = 'per_user';
-- Alerts at pg_keypool.alert_threshold (0.8) of a pool's budget.
SELECT keypool_set_budget('per_user', 0.05, 'day', per_user => 0.02);
SELECT kind, severity, pool FROM keypool_alerts WHERE kind = 'budget_near_limit' ORDER BY pool;
SELECT granted FROM keypool_reserve('carol', 'per_user', 5000);
SELECT kind, severity, pool, message FROM keypool_alerts WHERE kind = 'budget_near_limit' ORDER BY pool;

-- A month in the pool's time zone: 2030-10-31 20:00 in Los Angeles is still October.
SELECT keypool_create_pool('monthly', timezone => 'America/Los_Angeles') > 0 AS created;
SELECT keypool_add_key('monthly', 'openai', 'sk-budget-month-00000001', 'budget-model') IS NOT NULL AS added;
SELECT keypool_set_budget('monthly', 0.02, 'month');
SELECT keypool_set_clock('2030-11-01 03:00:00+00');
SELECT count(*) FILTER (WHERE (r).granted) AS granted, max((r).retry_after_ms) AS retry_after_ms
  FROM (SELECT keypool_reserve('u', 'monthly', 5000) AS r FROM generate_series(1, 3) i) s;
SELECT budget_resets_at FROM keypool_pool_stats WHERE pool = 'monthly';
SELECT keypool_set_clock('2030-11-01 07:00:00+00');
SELECT granted FROM keypool_reserve('u', 'monthly', 5000);

-- A budget never sends users down a fallback chain.
SELECT keypool_set_fallbacks('monthly', ARRAY['per_user']);
SELECT keypool_set_budget('monthly', 0.01, 'month');
SELECT granted, pool, error FROM keypool_reserve('u', 'monthly', 5000);

-- The usage report shows spend against budget.
SELECT keypool_flush() >= 0 AS flushed;
SELECT pool, budget, budget_period, sum(estimated_cost) AS cost, max(period_cost) AS period_cost
  FROM keypool_usage_report('2030-10-01', '2030-11-30') WHERE pool IN ('spend', 'per_user') GROUP BY 1, 2, 3 ORDER BY 1;

-- Bad input is refused and changes nothing.
SELECT try($$SELECT keypool_set_budget('spend', -1, 'day')$$);
SELECT try($$SELECT keypool_set_budget('spend', 0.0000001, 'day')$$);
SELECT try($$SELECT keypool_set_budget('spend', 'NaN', 'day')$$);
SELECT try($$SELECT keypool_set_budget('spend', 1, 'week')$$);
SELECT try($$SELECT keypool_set_budget('spend', 1, NULL)$$);
SELECT try($$SELECT keypool_set_budget('spend', 1e13, 'day')$$);
SELECT try($$SELECT keypool_set_budget('spend', 1e100, 'day')$$);
SELECT try($$SELECT keypool_set_budget(NULL, 1, 'day')$$);
SELECT try($$SELECT keypool_set_budget('no_such_pool', 1, 'day')$$);
SELECT try($$SELECT keypool_alter_pool('spend', default_cost => -0.5)$$);
SELECT budget, budget_period, default_cost FROM keypool_pool_stats WHERE pool = 'spend';
-- A key added later without a price: reservations say what is missing.
SELECT keypool_add_key('spend', 'openai', 'sk-budget-noprice-000001', 'unpriced-model') IS NOT NULL AS added;
SELECT regexp_replace(try($$SELECT keypool_reserve('u', 'spend', 10)$$), 'key [0-9]+', 'key N') AS try;
-- Setting a budget needs admin on the pool; a role that may only use it is refused, and the
-- spend of pools a role may not read stays out of what it can query (keypool.routing_state is
-- open to every role for keypool_pool_stats).
CREATE ROLE budget_user;
GRANT EXECUTE ON FUNCTION keypool_set_budget(text, numeric, text, numeric) TO budget_user;
GRANT USAGE ON SCHEMA keypool TO budget_user;
SELECT keypool_grant('spend', 'budget_user', 'use');
SET ROLE budget_user;
SELECT try($$SELECT keypool_set_budget('spend', 1000, 'day')$$);
SELECT try($$SELECT keypool_set_budget('per_user', 1000, 'day')$$);
SELECT count(*) AS pools_seen FROM keypool.routing_state();
RESET ROLE;
SELECT keypool_revoke('spend', 'budget_user', 'use');
REVOKE ALL ON FUNCTION keypool_set_budget(text, numeric, text, numeric) FROM budget_user;
REVOKE USAGE ON SCHEMA keypool FROM budget_user;
DROP ROLE budget_user;
SELECT budget FROM keypool_pool_stats WHERE pool = 'spend';
-- Removing the budget.
SELECT keypool_set_budget('spend', NULL, NULL);
SELECT budget, budget_period, spent FROM keypool_pool_stats WHERE pool = 'spend';
SELECT granted FROM keypool_reserve('u', 'spend', 10);
SELECT kind, pool, reason FROM keypool_events WHERE kind = 'budget_set' ORDER BY id;
DROP TABLE spend_grants;
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;
