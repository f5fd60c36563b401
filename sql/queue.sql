-- pg_keypool: the SQL request queue and the workers that carry it out.
--
-- Applications enqueue chat requests in OpenAI shape with keypool_submit() and read the answer
-- with keypool_result(); NOTIFY keypool_requests wakes the workers, NOTIFY keypool_results
-- (payload: the request id) tells listeners an answer is ready. Workers claim requests with
-- FOR UPDATE SKIP LOCKED under a lease, so any number of them can run; a request whose worker
-- died is claimed again when its lease runs out. Each request is tried at most max_attempts
-- times, then ends 'failed' with its last error. Waiting for capacity (POOL_EXHAUSTED) does not
-- count as an attempt: the request sleeps until the pool frees up, up to its deadline.

CREATE TABLE keypool.request (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      text NOT NULL,
    pool         text NOT NULL,
    request      jsonb NOT NULL,
    status       text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    not_before   timestamptz NOT NULL DEFAULT now(),
    deadline     timestamptz NOT NULL,
    claimed_by   text,
    lease_until  timestamptz,
    response     jsonb,
    error        text,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX request_pending ON keypool.request (not_before, id) WHERE status IN ('queued', 'running');

-- The workers, as their heartbeats report them.
CREATE TABLE keypool.worker (
    id          text PRIMARY KEY,
    version     text NOT NULL,
    host        text,
    pid         integer,
    started_at  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    served      bigint NOT NULL DEFAULT 0,
    failed      bigint NOT NULL DEFAULT 0,
    queue_done  bigint NOT NULL DEFAULT 0,
    -- Set by a clean stop; a worker that stopped cleanly is not missing (keypool_alerts).
    stopped_at  timestamptz
);

CREATE FUNCTION keypool_submit(user_id text, pool text, request jsonb,
                               max_wait interval DEFAULT '10 minutes', max_attempts integer DEFAULT 3)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
BEGIN
    IF user_id IS NULL OR user_id = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'user_id must not be empty or NULL';
    END IF;
    IF pool IS NULL OR NOT EXISTS (SELECT 1 FROM keypool.pool p WHERE p.name = keypool_submit.pool) THEN
        RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('pool "%s" does not exist', pool);
    END IF;
    IF request IS NULL OR jsonb_typeof(request) <> 'object'
       OR jsonb_typeof(request -> 'messages') IS DISTINCT FROM 'array'
       OR request -> 'messages' = '[]'::jsonb THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'request must be an object with a non-empty "messages" array',
            HINT = 'Use the OpenAI chat shape: {"messages": [{"role": "user", "content": "..."}], "max_tokens": 200}';
    END IF;
    IF max_wait IS NULL OR max_wait < interval '0' OR max_wait > interval '7 days' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'max_wait must be between 0 and 7 days';
    END IF;
    IF max_attempts IS NULL OR max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'max_attempts must be between 1 and 100';
    END IF;
    INSERT INTO keypool.request (user_id, pool, request, max_attempts, deadline)
    VALUES (user_id, pool, request, max_attempts, now() + max_wait)
    RETURNING id INTO new_id;
    PERFORM pg_notify('keypool_requests', new_id::text);
    RETURN new_id;
END
$$;

CREATE FUNCTION keypool_result(id bigint, OUT status text, OUT response jsonb, OUT error text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    SELECT r.status, r.response, r.error INTO status, response, error
      FROM keypool.request r WHERE r.id = keypool_result.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('request %s does not exist', id);
    END IF;
END
$$;

-- For workers: claims up to max_n requests that are due, under a lease. Requests whose lease ran
-- out after their last attempt end 'failed' here.
CREATE FUNCTION keypool_claim_requests(worker text, max_n integer, lease interval)
RETURNS TABLE (id bigint, user_id text, pool text, request jsonb, attempts integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    gave_up integer;
BEGIN
    WITH g AS (
        UPDATE keypool.request r
           SET status = 'failed', finished_at = now(), claimed_by = NULL, lease_until = NULL,
               error = concat_ws('; ', r.error, format('its worker stopped answering after %s attempts', r.attempts))
         WHERE r.status = 'running' AND r.lease_until < now() AND r.attempts >= r.max_attempts
        RETURNING r.id
    )
    SELECT count(pg_notify('keypool_results', g.id::text)) INTO gave_up FROM g;
    RETURN QUERY
    WITH due AS (
        SELECT r.id FROM keypool.request r
         WHERE (r.status = 'queued' OR (r.status = 'running' AND r.lease_until < now()))
           AND r.not_before <= now()
         ORDER BY r.not_before, r.id
         LIMIT greatest(max_n, 0)
         FOR UPDATE SKIP LOCKED
    )
    UPDATE keypool.request r
       SET status = 'running', claimed_by = worker, lease_until = now() + lease, attempts = r.attempts + 1
      FROM due WHERE r.id = due.id
    RETURNING r.id, r.user_id, r.pool, r.request, r.attempts;
END
$$;

-- For workers: how a claimed request ended. outcome is 'done' (with the response), 'failed'
-- (final, with the error), 'retry' (try again after retry_at; counts as an attempt) or 'wait'
-- (no capacity until retry_at; does not count). Returns false when the request is no longer this
-- worker's (its lease ran out and another worker took it).
CREATE FUNCTION keypool_complete_request(id bigint, worker text, outcome text, response jsonb DEFAULT NULL,
                                         error text DEFAULT NULL, retry_at timestamptz DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r keypool.request;
BEGIN
    IF outcome IS NULL OR outcome NOT IN ('done', 'failed', 'retry', 'wait') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('unknown outcome "%s"', outcome),
            HINT = 'One of done, failed, retry, wait.';
    END IF;
    SELECT * INTO r FROM keypool.request q
     WHERE q.id = keypool_complete_request.id AND q.claimed_by = worker AND q.status = 'running'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF outcome = 'retry' AND r.attempts >= r.max_attempts THEN
        outcome := 'failed';
        error := format('%s (after %s attempts)', error, r.attempts);
    ELSIF outcome = 'wait' AND retry_at > r.deadline THEN
        outcome := 'failed';
        error := format('%s: no capacity before the deadline (%s)', error, r.deadline);
    END IF;
    CASE outcome
        WHEN 'done' THEN
            UPDATE keypool.request q SET status = 'done', response = keypool_complete_request.response,
                   error = NULL, finished_at = now(), claimed_by = NULL, lease_until = NULL
             WHERE q.id = r.id;
        WHEN 'failed' THEN
            UPDATE keypool.request q SET status = 'failed', error = keypool_complete_request.error,
                   finished_at = now(), claimed_by = NULL, lease_until = NULL
             WHERE q.id = r.id;
        WHEN 'retry', 'wait' THEN
            UPDATE keypool.request q SET status = 'queued', error = keypool_complete_request.error,
                   not_before = coalesce(retry_at, now()), claimed_by = NULL, lease_until = NULL,
                   attempts = q.attempts - CASE WHEN outcome = 'wait' THEN 1 ELSE 0 END
             WHERE q.id = r.id;
    END CASE;
    IF outcome IN ('done', 'failed') THEN
        PERFORM pg_notify('keypool_results', r.id::text);
    ELSE
        PERFORM pg_notify('keypool_requests', r.id::text);
    END IF;
    RETURN true;
END
$$;

-- For workers: when the next queued request falls due or the next lease runs out (NULL: nothing
-- pending), so that an idle worker sleeps until then instead of polling.
CREATE FUNCTION keypool_queue_wake_at()
RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT least((SELECT min(r.not_before) FROM keypool.request r WHERE r.status = 'queued'),
                 (SELECT min(r.lease_until) FROM keypool.request r WHERE r.status = 'running'));
$$;

-- For workers: a heartbeat, with counts since the worker started.
CREATE FUNCTION keypool_worker_heartbeat(worker text, version text, host text, pid integer, started_at timestamptz,
                                         served bigint, failed bigint, queue_done bigint)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO keypool.worker AS w (id, version, host, pid, started_at, last_seen, served, failed, queue_done)
    VALUES (worker, version, host, pid, started_at, now(), served, failed, queue_done)
    ON CONFLICT (id) DO UPDATE SET version = excluded.version, host = excluded.host, pid = excluded.pid,
        started_at = excluded.started_at, last_seen = now(), served = excluded.served,
        failed = excluded.failed, queue_done = excluded.queue_done, stopped_at = NULL;
$$;

-- For workers: a clean stop.
CREATE FUNCTION keypool_worker_stopped(worker text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE keypool.worker w SET stopped_at = now(), last_seen = now() WHERE w.id = $1;
$$;

-- For workers: every pool and the models its keys serve (GET /v1/models), without any secret.
-- A pool without keys, or with keys that name no model, has a row with model NULL.
CREATE FUNCTION keypool_models()
RETURNS TABLE (pool text, model text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT DISTINCT p.name, k.model
      FROM keypool.pool p LEFT JOIN keypool.key k ON k.pool_id = p.id AND k.removed_at IS NULL
     ORDER BY 1, 2;
$$;

-- For the worker's `validate`: what it takes to call a key's provider, secret included.
CREATE FUNCTION keypool_key_credentials(key_id bigint, OUT provider text, OUT model text, OUT base_url text,
                                        OUT secret text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    SELECT k.provider, k.model, k.base_url, k.secret INTO provider, model, base_url, secret
      FROM keypool.key k WHERE k.id = key_id AND k.removed_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('key %s does not exist', key_id);
    END IF;
END
$$;

CREATE VIEW keypool_requests AS
SELECT id, user_id, pool, status, attempts, max_attempts, not_before, deadline, claimed_by, lease_until,
       error, submitted_at, finished_at
  FROM keypool.request;
COMMENT ON VIEW keypool_requests IS 'The SQL request queue: status, attempts, worker and lease of every request';

CREATE VIEW keypool_workers AS
SELECT id, version, host, pid, started_at, last_seen, now() - last_seen AS silent_for, served, failed, queue_done,
       stopped_at
  FROM keypool.worker;
COMMENT ON VIEW keypool_workers IS 'Workers as their heartbeats report them';

COMMENT ON FUNCTION keypool_submit(text, text, jsonb, interval, integer) IS
    'Enqueues a chat request (OpenAI shape) for the workers; returns its id';
COMMENT ON FUNCTION keypool_result(bigint) IS
    'Status (queued, running, done, failed), response and error of a submitted request';
COMMENT ON FUNCTION keypool_claim_requests(text, integer, interval) IS
    'For workers: claims due requests under a lease (FOR UPDATE SKIP LOCKED)';
COMMENT ON FUNCTION keypool_complete_request(bigint, text, text, jsonb, text, timestamptz) IS
    'For workers: records how a claimed request ended (done, failed, retry, wait)';
COMMENT ON FUNCTION keypool_queue_wake_at() IS
    'For workers: when the next queued request falls due or the next lease runs out';
COMMENT ON FUNCTION keypool_worker_heartbeat(text, text, text, integer, timestamptz, bigint, bigint, bigint) IS
    'For workers: records a heartbeat';
COMMENT ON FUNCTION keypool_worker_stopped(text) IS 'For workers: records a clean stop';
COMMENT ON FUNCTION keypool_models() IS 'Every pool and the models its keys serve (no secrets)';
COMMENT ON FUNCTION keypool_key_credentials(bigint) IS
    'For the worker''s validate: provider, model, base URL and secret of a key (grant with care)';

REVOKE ALL ON FUNCTION
    keypool_submit(text, text, jsonb, interval, integer),
    keypool_result(bigint),
    keypool_claim_requests(text, integer, interval),
    keypool_complete_request(bigint, text, text, jsonb, text, timestamptz),
    keypool_queue_wake_at(),
    keypool_worker_heartbeat(text, text, text, integer, timestamptz, bigint, bigint, bigint),
    keypool_worker_stopped(text),
    keypool_models(),
    keypool_key_credentials(bigint)
FROM PUBLIC;
REVOKE ALL ON keypool_requests, keypool_workers FROM PUBLIC;
