-- Fair in the minute (issue 28): limits on each user's rolling minute. The test clock stands
-- still between keypool_set_clock calls, so every wait below is exact.
SET timezone = 'UTC';
SET datestyle = 'ISO';
SELECT keypool_set_clock('2030-11-05 12:00:00+00');

-- Seed 000's pool: 15 Gemini keys x 15 RPM x 200 RPD, minimum share 30; no user takes more
-- than 0.8 of its minute.
SELECT keypool_create_pool('s000', min_share => 30, minute_share => 0.8) > 0 AS created;
SELECT count(keypool_add_key('s000', 'gemini', 'AIzaSy-s000-minute-' || lpad(i::text, 8, '0'),
                             'gemini-2.5-flash', rpm => 15, rpd => 200)) AS keys
  FROM generate_series(1, 15) i;

-- User A sends 300 at once: 180 of the minute's 225, the rest USER_RATE_LIMITED with the
-- exact wait (the first of A's grants leaves the window a minute after it was made).
WITH r AS MATERIALIZED (SELECT keypool_reserve('user-a', 's000') AS r FROM generate_series(1, 300))
SELECT count(*) FILTER (WHERE (r).granted) AS granted,
       count(*) FILTER (WHERE (r).error = 'USER_RATE_LIMITED') AS user_rate_limited,
       min((r).retry_after_ms) FILTER (WHERE NOT (r).granted) AS min_wait,
       max((r).retry_after_ms) FILTER (WHERE NOT (r).granted) AS max_wait
  FROM r;
SELECT requests_this_minute, minute_request_limit, open_reservations FROM keypool_allocation('user-a', 's000');
-- User B, right after: granted (room was left for a newcomer).
SELECT granted, error FROM keypool_reserve('user-b', 's000');
-- B takes the rest of the minute; then the pool is exhausted for both, each told their own.
WITH r AS MATERIALIZED (SELECT keypool_reserve('user-b', 's000') AS r FROM generate_series(1, 60))
SELECT count(*) FILTER (WHERE (r).granted) AS granted, min((r).error) AS refused_as FROM r;
SELECT granted, error, retry_after_ms FROM keypool_reserve('user-a', 's000');

-- The next minute, both asking all the time, A twice as fast as B: each gets close to half
-- (a tenth of a second per step, A asks four times and B twice).
CREATE TEMP TABLE asks (step int, who text, granted boolean, error text);
DO $$
BEGIN
    FOR step IN 1..600 LOOP
        PERFORM keypool_set_clock('2030-11-05 12:01:00+00'::timestamptz + step * interval '100 ms');
        INSERT INTO asks
        SELECT step, who, (r).granted, (r).error
          FROM (SELECT who, keypool_reserve('user-' || who, 's000') AS r
                  FROM unnest(ARRAY['a', 'a', 'b', 'a', 'a', 'b']) WITH ORDINALITY AS t(who, n)
                 ORDER BY n) s;
    END LOOP;
END
$$;
SELECT who, count(*) FILTER (WHERE granted) AS granted,
       round(100.0 * count(*) FILTER (WHERE granted) / sum(count(*) FILTER (WHERE granted)) OVER ()) AS percent,
       count(*) FILTER (WHERE error = 'USER_RATE_LIMITED') > 0 AS held_back
  FROM asks GROUP BY who ORDER BY who;
-- Never more than the keys allow: 225 in any minute.
SELECT count(*) FILTER (WHERE granted) <= 225 AS within_the_keys FROM asks;

-- What one does not ask for flows to the others: alone again (B quiet for a minute), A takes
-- its whole share, 180.
SELECT keypool_set_clock('2030-11-05 12:03:30+00');
SELECT count(*) FILTER (WHERE (keypool_reserve('user-a', 's000')).granted) AS granted
  FROM generate_series(1, 200);

-- Weighted like the daily share: a pro user (weight 5) and a free guest, both asking every
-- 100 ms for a minute, in a pool of 240 a minute: 200 and 40.
SELECT keypool_create_pool('weighted', minute_share => 1) > 0 AS created;
SELECT count(keypool_add_key('weighted', 'openai', 'sk-weighted-minute-' || lpad(i::text, 10, '0'), rpm => 15))
  FROM generate_series(1, 16) i;
SELECT keypool_set_user_weight('pro', 'weighted', 5);
SELECT keypool_set_clock('2030-11-05 12:10:00+00');
CREATE TEMP TABLE tier_asks (who text, granted boolean);
DO $$
BEGIN
    FOR step IN 1..600 LOOP
        PERFORM keypool_set_clock('2030-11-05 12:10:00+00'::timestamptz + step * interval '100 ms');
        INSERT INTO tier_asks
        SELECT who, (keypool_reserve(who, 'weighted')).granted
          FROM unnest(ARRAY['pro', 'free']) WITH ORDINALITY AS t(who, n) ORDER BY n;
    END LOOP;
END
$$;
SELECT who, count(*) FILTER (WHERE granted) AS granted FROM tier_asks GROUP BY who ORDER BY who DESC;

-- Fixed caps per user: user_rpm, user_tpm and user_max_concurrent.
SELECT keypool_create_pool('capped') > 0 AS created;
SELECT keypool_add_key('capped', 'openai', 'sk-capped-minute-key-00001', rpm => 1000, tpm => 1000000) > 0 AS added;
SELECT keypool_alter_pool('capped', user_rpm => 5, user_tpm => 1000, user_max_concurrent => 2);
SELECT reservation_id AS c1 FROM keypool_reserve('carol', 'capped', 100) \gset
SELECT reservation_id AS c2 FROM keypool_reserve('carol', 'capped', 100) \gset
SELECT requests_this_minute, minute_request_limit, tokens_this_minute, minute_token_limit, open_reservations
  FROM keypool_allocation('carol', 'capped');
-- Two open at once: the third waits (at most a second; any of them may be settled).
SELECT granted, error, retry_after_ms FROM keypool_reserve('carol', 'capped', 100);
-- Another user is not held back by carol.
SELECT granted FROM keypool_reserve('dave', 'capped', 100);
SELECT keypool_settle(:c1, 200, 50, 50) AS outcome;
SELECT keypool_release(:c2);
-- Settled: 1 request and 100 tokens; released: nothing. Four more, each settled at once with
-- 10 tokens, fit; the sixth waits until the first leaves the window.
SELECT count(keypool_settle((keypool_reserve('carol', 'capped', 10)).reservation_id, 200, 5, 5)) AS settled
  FROM generate_series(1, 4);
SELECT granted, error, retry_after_ms FROM keypool_reserve('carol', 'capped', 10);
-- Tokens: 1,000 a minute; 140 settled: 900 more do not fit, 860 do.
SELECT keypool_alter_pool('capped', user_rpm => 0, user_max_concurrent => 0);
SELECT granted, error FROM keypool_reserve('carol', 'capped', 900);
SELECT granted FROM keypool_reserve('carol', 'capped', 860);
-- A minute later everything has left the window.
SELECT keypool_set_clock('2030-11-05 12:04:31+00');
SELECT granted FROM keypool_reserve('carol', 'capped', 1000);

-- Bad input changes nothing.
SELECT try($$SELECT keypool_create_pool('bad', minute_share => 1.5)$$);
SELECT try($$SELECT keypool_create_pool('bad', minute_share => 0)$$);
SELECT try($$SELECT keypool_alter_pool('capped', minute_share => -0.1)$$);
SELECT try($$SELECT keypool_alter_pool('capped', user_rpm => -1)$$);
SELECT count(*) AS pools_named_bad FROM keypool_pool_stats WHERE pool = 'bad';
SELECT keypool_set_clock(NULL) IS NOT NULL AS clock_back;
