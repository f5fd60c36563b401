-- pg_keypool: operations in SQL. Prices for cost estimates, the usage report, alerts and their
-- notifications, and the background upkeep of events and finished queue requests. The public
-- functions are in operations.rs (they check the caller's rights and call the internal ones
-- below as the extension's owner); the views built on these (keypool_key_stats, keypool_alerts,
-- keypool_health, keypool_prices) are in api.sql.
--
-- Every row of keypool.event is announced with NOTIFY on channel keypool_events. The payload is
-- the event's id only: reading the event (keypool_events) needs `read` on its pool.

-- Prices per provider and model (model '' = every model of the provider without its own row),
-- for the usage report's cost estimate. Editable: keypool_set_price().
CREATE TABLE keypool.price (
    provider           text NOT NULL,
    model              text NOT NULL DEFAULT '',
    input_per_million  numeric NOT NULL CHECK (input_per_million >= 0),
    output_per_million numeric NOT NULL CHECK (output_per_million >= 0),
    per_request        numeric NOT NULL DEFAULT 0 CHECK (per_request >= 0),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model)
);
SELECT pg_catalog.pg_extension_config_dump('keypool.price', '');
-- Budgets hold costs from prices: every backend's cache reloads when they change.
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keypool.price
    FOR EACH STATEMENT EXECUTE FUNCTION keypool.config_changed();

-- Alerts raised and not yet cleared (keypool.check_alerts compares keypool_alerts with this).
CREATE TABLE keypool.alert (
    alert_key  text PRIMARY KEY,
    kind       text NOT NULL,
    severity   text NOT NULL,
    message    text NOT NULL,
    raised_at  timestamptz NOT NULL,
    -- The pool the alert is about (NULL: none, such as a silent worker).
    pool_id    bigint
);

CREATE FUNCTION keypool.notify_event() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('keypool_events', new.id::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER notify_event AFTER INSERT ON keypool.event
    FOR EACH ROW EXECUTE FUNCTION keypool.notify_event();

-- Per key per day (in the time zone of the key's account, as providers count days): calls,
-- tokens, errors and the estimated cost, from the hourly history, for the pools listed.
CREATE FUNCTION keypool.usage_report(pools bigint[], from_day date, to_day date)
RETURNS TABLE (day date, pool text, key_id bigint, label text, provider text, model text, requests bigint,
               prompt_tokens bigint, completion_tokens bigint, errors bigint, estimated_cost numeric,
               budget numeric, budget_period text, period_cost numeric)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    IF from_day IS NULL OR to_day IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004', MESSAGE = 'from_day and to_day must not be NULL';
    END IF;
    IF from_day > to_day THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('from_day (%s) is after to_day (%s)', from_day, to_day);
    END IF;
    IF to_day - from_day > 3660 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'the report spans more than ten years';
    END IF;
    -- Spend against budget: each row also carries its pool's budget and what the report's rows
    -- of the same pool and budget period add up to.
    RETURN QUERY
    SELECT r.day, r.pool, r.key_id, r.label, r.provider, r.model, r.requests, r.prompt_tokens,
           r.completion_tokens, r.errors, r.estimated_cost, r.budget, r.budget_period,
           CASE WHEN r.budget_period IS NOT NULL THEN
               sum(r.estimated_cost) OVER (PARTITION BY r.pool,
                   CASE r.budget_period WHEN 'month' THEN date_trunc('month', r.day) ELSE r.day END)
           END
      FROM (
        SELECT d.day, p.name AS pool, k.id AS key_id, k.label, k.provider, k.model,
               sum(u.requests)::bigint AS requests, sum(u.prompt_tokens)::bigint AS prompt_tokens,
               sum(u.completion_tokens)::bigint AS completion_tokens,
               sum(u.rate_limited + u.daily_quota + u.key_invalid + u.billing + u.server_error + u.caller_error + u.other)::bigint AS errors,
               round(sum(u.prompt_tokens) * pr.input_per_million / 1e6 + sum(u.completion_tokens) * pr.output_per_million / 1e6
                     + sum(u.requests - u.released) * pr.per_request, 6) AS estimated_cost,
               (p.budget_micros::numeric / 1000000)::numeric(20, 6) AS budget,
               p.budget_period
          FROM keypool.usage_hourly u
          JOIN keypool.key k ON k.id = u.key_id
          JOIN keypool.pool p ON p.id = k.pool_id
          JOIN keypool.scope s ON s.id = k.scope_id
          CROSS JOIN LATERAL (SELECT (u.hour AT TIME ZONE s.timezone)::date AS day) d
          LEFT JOIN LATERAL (SELECT x.input_per_million, x.output_per_million, x.per_request
                               FROM keypool.price x
                              WHERE x.provider = k.provider AND x.model IN (coalesce(k.model, ''), '')
                              ORDER BY x.model DESC LIMIT 1) pr ON true
         WHERE u.hour >= (from_day - 1)::timestamptz AND u.hour < (to_day + 2)::timestamptz
           AND d.day BETWEEN from_day AND to_day
           AND p.id = ANY (pools)
         GROUP BY d.day, p.name, k.id, k.label, k.provider, k.model, pr.input_per_million, pr.output_per_million,
                  pr.per_request, p.budget_micros, p.budget_period) r
     ORDER BY r.day, r.pool, r.key_id;
END
$$;

-- Compares keypool_alerts with the alerts raised before: new ones are recorded as 'alert'
-- events, gone ones as 'alert_cleared' (both announced on keypool_events). Returns how many
-- alerts were raised. Runs as the extension's owner (keypool_check_alerts, the background),
-- which sees every pool's alerts.
CREATE FUNCTION keypool.check_alerts()
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
DECLARE
    raised bigint;
BEGIN
    -- One checker at a time (the background and a caller may overlap).
    PERFORM pg_advisory_xact_lock(hashtext('pg_keypool.check_alerts'));
    WITH cur AS (
        SELECT a.alert_key, a.kind, a.severity, a.message, p.id AS pool_id
          FROM @extschema@.keypool_alerts a LEFT JOIN keypool.pool p ON p.name = a.pool),
    gone AS (
        DELETE FROM keypool.alert a
         WHERE NOT EXISTS (SELECT 1 FROM cur c WHERE c.alert_key = a.alert_key)
        RETURNING a.*),
    new AS (
        INSERT INTO keypool.alert (alert_key, kind, severity, message, raised_at, pool_id)
        SELECT c.alert_key, c.kind, c.severity, c.message, @extschema@.keypool_now(), c.pool_id FROM cur c
         WHERE NOT EXISTS (SELECT 1 FROM keypool.alert a WHERE a.alert_key = c.alert_key)
        RETURNING *),
    events AS (
        INSERT INTO keypool.event (at, kind, pool_id, reason)
        SELECT @extschema@.keypool_now(), e.kind, e.pool_id, e.reason
          FROM (SELECT 1 AS o, g.alert_key, 'alert_cleared' AS kind, g.pool_id, g.kind || ': ' || g.message AS reason
                  FROM gone g
                UNION ALL
                SELECT 2, n.alert_key, 'alert', n.pool_id, n.severity || ' ' || n.kind || ': ' || n.message FROM new n) e
         ORDER BY e.o, e.alert_key
        RETURNING kind)
    SELECT count(*) FILTER (WHERE kind = 'alert') INTO raised FROM events;
    RETURN raised;
END
$$;

-- Background upkeep (the flusher, every pg_keypool.flush_interval): alerts, events older than
-- pg_keypool.event_retention, finished queue requests older than pg_keypool.request_retention,
-- and grants to roles that were dropped (so that a later role given the same oid inherits none).
CREATE FUNCTION keypool.maintain()
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
BEGIN
    PERFORM keypool.check_alerts();
    DELETE FROM keypool.event e
     WHERE e.at < @extschema@.keypool_now() - coalesce(nullif(current_setting('pg_keypool.event_retention', true), '')::interval,
                                                        interval '30 days');
    DELETE FROM keypool.request r
     WHERE r.status IN ('done', 'failed')
       AND r.finished_at < now() - coalesce(nullif(current_setting('pg_keypool.request_retention', true), '')::interval,
                                            interval '7 days');
    DELETE FROM keypool.pool_grant g
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = g.grantee::oid);
END
$$;

COMMENT ON FUNCTION keypool.usage_report(bigint[], date, date) IS 'Internal: keypool_usage_report for the pools given';
COMMENT ON FUNCTION keypool.check_alerts() IS 'Internal: keypool_check_alerts, as the extension''s owner';
COMMENT ON FUNCTION keypool.maintain() IS
    'Internal: background upkeep (alerts, event retention, finished queue requests, grants of dropped roles)';
COMMENT ON FUNCTION keypool.notify_event() IS 'Internal: announces every event''s id on channel keypool_events';

REVOKE ALL ON FUNCTION
    keypool.usage_report(bigint[], date, date),
    keypool.check_alerts(),
    keypool.maintain(),
    keypool.notify_event()
FROM PUBLIC;
