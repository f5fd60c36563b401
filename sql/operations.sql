-- pg_keypool: operations in SQL. Prices for cost estimates, the usage report, alerts and their
-- notifications, bulk re-enabling, and the background upkeep of events. The views built on
-- these (keypool_key_stats, keypool_alerts, keypool_health, keypool_prices) are in api.sql.
--
-- Every row of keypool.event is announced with NOTIFY on channel keypool_events (payload: the
-- event as JSON): state changes (keys disabled, enabled, cooling after a rate limit, breakers
-- opening, accounts disabled, usage resets, rebalances) and alerts raised or cleared.

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

-- Alerts raised and not yet cleared (keypool_check_alerts compares keypool_alerts with this).
CREATE TABLE keypool.alert (
    alert_key  text PRIMARY KEY,
    kind       text NOT NULL,
    severity   text NOT NULL,
    message    text NOT NULL,
    raised_at  timestamptz NOT NULL
);

CREATE FUNCTION keypool.notify_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keypool_events', json_build_object(
        'id', new.id, 'at', new.at, 'kind', new.kind,
        'pool', (SELECT p.name FROM keypool.pool p WHERE p.id = new.pool_id),
        'key_id', new.key_id, 'scope_id', new.scope_id, 'reason', left(new.reason, 2000))::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER notify_event AFTER INSERT ON keypool.event
    FOR EACH ROW EXECUTE FUNCTION keypool.notify_event();

CREATE FUNCTION keypool_set_price(provider text, model text, input_per_million numeric, output_per_million numeric,
                                  per_request numeric DEFAULT 0)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF provider IS NULL OR input_per_million IS NULL OR output_per_million IS NULL OR per_request IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22004',
            MESSAGE = 'provider, input_per_million, output_per_million and per_request must not be NULL',
            HINT = 'Use model => NULL (or '''') for the price of every model of the provider.';
    END IF;
    IF input_per_million < 0 OR output_per_million < 0 OR per_request < 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'prices must not be negative';
    END IF;
    INSERT INTO keypool.price AS p (provider, model, input_per_million, output_per_million, per_request, updated_at)
    VALUES (provider, coalesce(model, ''), input_per_million, output_per_million, per_request, now())
    ON CONFLICT ON CONSTRAINT price_pkey DO UPDATE
       SET input_per_million = excluded.input_per_million, output_per_million = excluded.output_per_million,
           per_request = excluded.per_request, updated_at = now();
END
$$;

-- Per key per day (in the time zone of the key's account, as providers count days): calls,
-- tokens, errors and the estimated cost, from the hourly history.
CREATE FUNCTION keypool_usage_report(from_day date, to_day date)
RETURNS TABLE (day date, pool text, key_id bigint, label text, provider text, model text, requests bigint,
               prompt_tokens bigint, completion_tokens bigint, errors bigint, estimated_cost numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    RETURN QUERY
    SELECT d.day, p.name, k.id, k.label, k.provider, k.model,
           sum(u.requests)::bigint, sum(u.prompt_tokens)::bigint, sum(u.completion_tokens)::bigint,
           sum(u.rate_limited + u.daily_quota + u.key_invalid + u.billing + u.server_error + u.caller_error + u.other)::bigint,
           round(sum(u.prompt_tokens) * pr.input_per_million / 1e6 + sum(u.completion_tokens) * pr.output_per_million / 1e6
                 + sum(u.requests - u.released) * pr.per_request, 6)
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
     GROUP BY d.day, p.name, k.id, k.label, k.provider, k.model, pr.input_per_million, pr.output_per_million, pr.per_request
     ORDER BY d.day, p.name, k.id;
END
$$;

-- Re-enables the keys (and accounts) that provider answers disabled (401, API_KEY_INVALID,
-- billing), in one pool or all; keys an operator disabled stay disabled. Returns how many.
CREATE FUNCTION keypool_enable_keys(pool text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k record;
    n bigint := 0;
BEGIN
    IF pool IS NOT NULL AND NOT EXISTS (SELECT 1 FROM keypool.pool p WHERE p.name = keypool_enable_keys.pool) THEN
        RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('pool "%s" does not exist', pool);
    END IF;
    FOR k IN
        SELECT key.id
          FROM keypool.key key
          JOIN keypool.pool p ON p.id = key.pool_id
          JOIN keypool.scope s ON s.id = key.scope_id
         WHERE key.removed_at IS NULL
           AND (keypool_enable_keys.pool IS NULL OR p.name = keypool_enable_keys.pool)
           AND (key.disabled_by = 'provider' OR (s.disabled_by = 'provider' AND key.disabled_reason IS NULL))
         ORDER BY key.id
    LOOP
        PERFORM @extschema@.keypool_enable_key(k.id);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Compares keypool_alerts with the alerts raised before: new ones are recorded as 'alert'
-- events, gone ones as 'alert_cleared' (both announced on keypool_events). Returns how many
-- alerts were raised. Runs in the background every pg_keypool.flush_interval.
CREATE FUNCTION keypool_check_alerts()
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    raised bigint;
BEGIN
    -- One checker at a time (the background and a caller may overlap).
    PERFORM pg_advisory_xact_lock(hashtext('pg_keypool.check_alerts'));
    WITH cur AS (
        SELECT a.alert_key, a.kind, a.severity, a.message FROM @extschema@.keypool_alerts a),
    gone AS (
        DELETE FROM keypool.alert a
         WHERE NOT EXISTS (SELECT 1 FROM cur c WHERE c.alert_key = a.alert_key)
        RETURNING a.*),
    new AS (
        INSERT INTO keypool.alert
        SELECT c.alert_key, c.kind, c.severity, c.message, @extschema@.keypool_now() FROM cur c
         WHERE NOT EXISTS (SELECT 1 FROM keypool.alert a WHERE a.alert_key = c.alert_key)
        RETURNING *),
    events AS (
        INSERT INTO keypool.event (at, kind, reason)
        SELECT @extschema@.keypool_now(), e.kind, e.reason
          FROM (SELECT 1 AS o, g.alert_key, 'alert_cleared' AS kind, g.kind || ': ' || g.message AS reason FROM gone g
                UNION ALL
                SELECT 2, n.alert_key, 'alert', n.severity || ' ' || n.kind || ': ' || n.message FROM new n) e
         ORDER BY e.o, e.alert_key
        RETURNING kind)
    SELECT count(*) FILTER (WHERE kind = 'alert') INTO raised FROM events;
    RETURN raised;
END
$$;

-- Background upkeep (the flusher, every pg_keypool.flush_interval): alerts, and events older
-- than pg_keypool.event_retention.
CREATE FUNCTION keypool.maintain()
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM @extschema@.keypool_check_alerts();
    DELETE FROM keypool.event e
     WHERE e.at < @extschema@.keypool_now() - coalesce(nullif(current_setting('pg_keypool.event_retention', true), '')::interval,
                                   interval '30 days');
END
$$;

REVOKE ALL ON FUNCTION
    keypool_set_price(text, text, numeric, numeric, numeric),
    keypool_usage_report(date, date),
    keypool_enable_keys(text),
    keypool_check_alerts(),
    keypool.maintain(),
    keypool.notify_event()
FROM PUBLIC;
