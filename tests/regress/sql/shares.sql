-- Fair daily shares (seed 000): a pool's daily capacity divided among its users.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-05-01 12:00:00+00');  -- 05:00 in Los Angeles

-- 15 Gemini keys x 200 requests per day = 3,000 a day, and nobody gets fewer than 30.
SELECT keypool_create_pool('seed000', min_share => 30);
SELECT count(*) AS keys FROM (
    SELECT keypool_add_key('seed000', 'gemini', 'AIzaSy-seed000-' || lpad(i::text, 2, '0') || '-xxxxxxxxxxxx',
                           'gemini-2.5-flash', rpm => 15, rpd => 200)
      FROM generate_series(1, 15) i) k;

-- Seed 000's table: 1, 10, 50, 100 and 200 users.
CREATE TABLE seed000 (users int, share bigint, overcommit numeric);
CREATE FUNCTION seed000_row(n int) RETURNS void LANGUAGE sql AS $$
    SELECT keypool_assign('user-' || i, 'seed000') FROM generate_series(1, n) i;
    INSERT INTO seed000
    SELECT n, (SELECT allocated_today FROM keypool_allocation('user-1', 'seed000')), s.overcommit
      FROM keypool_pool_stats s WHERE s.pool = 'seed000';
$$;
SELECT seed000_row(n) FROM unnest(ARRAY[1, 10, 50, 100, 200]) n;
SELECT * FROM seed000 ORDER BY users;
-- 200 users x 30 promised = twice the capacity: the pool is overcommitted.
SELECT daily_capacity, members, counted_users, min_share, share_per_user, overcommit
  FROM keypool_pool_stats WHERE pool = 'seed000';

-- Reserving enforces the share: user-1 gets exactly 30 today, then QUOTA_EXCEEDED until the
-- next reset (midnight in Los Angeles, 07:00 UTC), with a warning level all along.
WITH r AS MATERIALIZED (
    SELECT i, keypool_reserve('user-1', 'seed000') AS r FROM generate_series(1, 31) i
)
SELECT i, (r).granted, (r).error, (r).retry_after_ms, (r).remaining_today, (r).allocated_today, (r).warning_level
  FROM r WHERE i IN (1, 2, 24, 25, 28, 29, 30, 31) ORDER BY i;
SELECT * FROM keypool_allocation('user-1', 'seed000');
SELECT keypool_can_request('user-1', 'seed000') AS user_1_can, keypool_can_request('user-2', 'seed000') AS user_2_can;
-- A new day in Los Angeles: the share is back.
SELECT keypool_set_clock('2030-05-02 07:00:00+00');
SELECT granted, remaining_today, allocated_today, warning_level FROM keypool_reserve('user-1', 'seed000');
-- Someone who was never assigned shares too, as one more user (not counted for the others).
SELECT allocated_today FROM keypool_allocation('a-stranger', 'seed000');

-- Tiers: 8 free users (weight 1) and 2 pro users (weight 4) over 1,000 a day: W = 16.
SELECT keypool_create_pool('tiers');
SELECT count(*) AS keys FROM (
    SELECT keypool_add_key('tiers', 'openai', 'sk-tiers-' || i || '-000000000000', rpd => 200)
      FROM generate_series(1, 5) i) k;
SELECT count(*) AS users FROM (SELECT keypool_assign('free-' || i, 'tiers') FROM generate_series(1, 8) i) u;
SELECT keypool_set_user_weight('pro-' || i, 'tiers', 4) FROM generate_series(1, 2) i;
SELECT user_id, weight FROM keypool_members WHERE pool = 'tiers' AND user_id LIKE 'pro-%' ORDER BY 1;
SELECT u, (SELECT allocated_today FROM keypool_allocation(u, 'tiers')) FROM unnest(ARRAY['free-1', 'pro-1']) u;
SELECT try($$SELECT keypool_set_user_weight('pro-1', 'tiers', 0)$$);
SELECT try($$SELECT keypool_set_user_weight('pro-1', 'tiers', -2)$$);
SELECT try($$SELECT keypool_set_user_weight('pro-1', 'tiers', NULL)$$);
SELECT try($$SELECT keypool_set_user_weight('pro-1', 'nope', 2)$$);
-- At most 16 distinct weights per pool.
SELECT try($$SELECT keypool_set_user_weight('t-' || i, 'tiers', i + 0.5) FROM generate_series(1, 20) i$$);
SELECT count(DISTINCT weight) AS weights FROM keypool_members WHERE pool = 'tiers';

-- Borrowing: capacity 100, three users with 33 each; 99 promised, so 1 request may be lent.
SELECT keypool_create_pool('lend', borrowing => true);
SELECT keypool_add_key('lend', 'openai', 'sk-lend-key-0000000001', rpd => 100);
SELECT count(*) FROM (SELECT keypool_assign(u, 'lend') FROM unnest(ARRAY['a', 'b', 'c']) u) x;
WITH r AS MATERIALIZED (SELECT i, keypool_reserve('a', 'lend') AS r FROM generate_series(1, 35) i)
SELECT i, (r).granted, (r).error, (r).remaining_today, (r).warning_level FROM r WHERE i >= 33 ORDER BY i;
SELECT borrowed_today FROM keypool_pool_stats WHERE pool = 'lend';
-- What b and c were promised is untouched.
WITH r AS MATERIALIZED (
    SELECT u, keypool_reserve(u, 'lend') AS r FROM unnest(ARRAY['b', 'c']) u, generate_series(1, 34) i
)
SELECT u, count(*) FILTER (WHERE (r).granted) AS granted FROM r GROUP BY u ORDER BY u;
-- Without borrowing, the 34th request of a user is refused.
SELECT keypool_alter_pool('lend', borrowing => false);
SELECT keypool_set_clock('2030-05-03 07:00:00+00');
WITH r AS MATERIALIZED (SELECT i, keypool_reserve('a', 'lend') AS r FROM generate_series(1, 34) i)
SELECT count(*) FILTER (WHERE (r).granted) AS granted, count(*) FILTER (WHERE (r).error = 'QUOTA_EXCEEDED') AS refused FROM r;

-- Activity window: only users active within the last 7 days share the capacity (120 a day).
SELECT keypool_create_pool('window', active_window => '7 days', timezone => 'UTC');
SELECT keypool_add_key('window', 'xai', 'xai-window-key-00000001', 'grok-4', rpd => 120);
SELECT count(*) FROM (SELECT keypool_assign('w' || i, 'window') FROM generate_series(1, 6) i) x;
SELECT keypool_set_clock('2030-06-01 10:00:00+00');
-- Shares are fixed at a user's first request of the day, from who is counted then.
SELECT u, allocated_today FROM unnest(ARRAY['w1', 'w2', 'w3']) u, LATERAL keypool_reserve(u, 'window') r;
SELECT counted_users, members FROM keypool_pool_stats WHERE pool = 'window';
SELECT allocated_today AS w4_would_get FROM keypool_allocation('w4', 'window');
SELECT keypool_set_clock('2030-06-04 10:00:00+00');
SELECT allocated_today AS w4_gets FROM keypool_reserve('w4', 'window');
-- Eight days later w1..w3 have left the window; w4 (active 5 days ago) has not.
SELECT keypool_set_clock('2030-06-09 10:00:00+00');
SELECT counted_users FROM keypool_pool_stats WHERE pool = 'window';
SELECT allocated_today AS w5_gets FROM keypool_reserve('w5', 'window');
SELECT try($$SELECT keypool_create_pool('bad1', active_window => '1 month')$$);
SELECT try($$SELECT keypool_create_pool('bad2', active_window => '100 days')$$);
SELECT try($$SELECT keypool_create_pool('bad3', min_share => -1)$$);
SELECT try($$SELECT keypool_create_pool('bad4', timezone => 'Moon/Base')$$);
SELECT try($$SELECT keypool_alter_pool('nope', min_share => 1)$$);
SELECT keypool_alter_pool('window', active_window => '0');
SELECT active_days, counted_users FROM keypool_pool_stats WHERE pool = 'window';

-- A pool whose keys have no daily limit has no shares: nothing to divide.
SELECT keypool_create_pool('open');
SELECT keypool_add_key('open', 'ollama', 'ollama-open-0000000001', 'llama3.1');
SELECT granted, remaining_today, allocated_today, warning_level FROM keypool_reserve('anyone', 'open');
SELECT * FROM keypool_allocation('anyone', 'open');

SELECT abs(extract(epoch FROM keypool_set_clock(NULL) - now())) < 600 AS back_to_wall_time;
