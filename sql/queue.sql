-- pg_keypool: the SQL request queue and the workers that carry it out.
--
-- Applications enqueue chat requests in OpenAI shape with keypool_submit() and read the answer
-- with keypool_result(); NOTIFY keypool_requests wakes the workers, NOTIFY keypool_results
-- (payload: the request id) tells listeners an answer is ready. Workers claim requests with
-- FOR UPDATE SKIP LOCKED under a lease, so any number of them can run; a request whose worker
-- died is claimed again when its lease runs out. Each request is tried at most max_attempts
-- times, then ends 'failed' with its last error. Waiting for capacity (POOL_EXHAUSTED) does not
-- count as an attempt: the request sleeps until the pool frees up, up to its deadline.
--
-- Every request records the role that submitted it: only that role (and the pool's
-- administrators) sees it and its result. A worker claims only requests of pools its role may
-- use, and only the role holding a request's lease completes it. The public functions
-- (queue.rs) check the caller and call the internal functions below as the extension's owner;
-- nobody else may call those.

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
    finished_at  timestamptz,
    -- The role that submitted the request, and the role of the worker holding its lease.
    submitted_by regrole NOT NULL,
    claimed_role regrole
);
CREATE INDEX request_pending ON keypool.request (not_before, id) WHERE status IN ('queued', 'running');
-- Finished requests are deleted after pg_keypool.request_retention (keypool.maintain).
CREATE INDEX request_finished ON keypool.request (finished_at) WHERE status IN ('done', 'failed');

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
    stopped_at  timestamptz,
    -- The role whose heartbeats these are: only it reports for this worker id.
    role        regrole NOT NULL
);

-- Enqueues a request of role submitted_by (keypool_submit checked its right to the pool and the
-- request's size).
CREATE FUNCTION keypool.enqueue(submitted_by regrole, user_id text, pool text, request jsonb, max_wait interval,
                                max_attempts integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
DECLARE
    new_id bigint;
BEGIN
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
    INSERT INTO keypool.request (user_id, pool, request, max_attempts, deadline, submitted_by)
    VALUES (user_id, pool, request, max_attempts, now() + max_wait, submitted_by)
    RETURNING id INTO new_id;
    PERFORM pg_notify('keypool_requests', new_id::text);
    RETURN new_id;
END
$$;

-- Claims up to max_n due requests of the pools named, under a lease, for role claimer. Requests
-- whose lease ran out after their last attempt end 'failed' here.
CREATE FUNCTION keypool.claim_requests(claimer regrole, pools text[], worker text, max_n integer, lease interval)
RETURNS TABLE (id bigint, user_id text, pool text, request jsonb, attempts integer)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
#variable_conflict use_column
DECLARE
    gave_up integer;
BEGIN
    WITH g AS (
        UPDATE keypool.request r
           SET status = 'failed', finished_at = now(), claimed_by = NULL, claimed_role = NULL, lease_until = NULL,
               error = concat_ws('; ', r.error, format('its worker stopped answering after %s attempts', r.attempts))
         WHERE r.status = 'running' AND r.lease_until < now() AND r.attempts >= r.max_attempts
           AND r.pool = ANY (pools)
        RETURNING r.id
    )
    SELECT count(pg_notify('keypool_results', g.id::text)) INTO gave_up FROM g;
    RETURN QUERY
    WITH due AS (
        SELECT r.id FROM keypool.request r
         WHERE (r.status = 'queued' OR (r.status = 'running' AND r.lease_until < now()))
           AND r.not_before <= now()
           AND r.pool = ANY (pools)
         ORDER BY r.not_before, r.id
         LIMIT greatest(max_n, 0)
         FOR UPDATE SKIP LOCKED
    )
    UPDATE keypool.request r
       SET status = 'running', claimed_by = worker, claimed_role = claimer, lease_until = now() + lease,
           attempts = r.attempts + 1
      FROM due WHERE r.id = due.id
    RETURNING r.id, r.user_id, r.pool, r.request, r.attempts;
END
$$;

-- How a claimed request ended (see keypool_complete_request). Only the role that holds the
-- lease completes it; false when the request is no longer this worker's.
CREATE FUNCTION keypool.complete_request(claimer regrole, id bigint, worker text, outcome text, response jsonb,
                                         error text, retry_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, keypool, pg_temp AS $$
DECLARE
    r keypool.request;
BEGIN
    IF outcome IS NULL OR outcome NOT IN ('done', 'failed', 'retry', 'wait') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('unknown outcome "%s"', outcome),
            HINT = 'One of done, failed, retry, wait.';
    END IF;
    SELECT * INTO r FROM keypool.request q
     WHERE q.id = complete_request.id AND q.claimed_by = worker AND q.claimed_role = claimer AND q.status = 'running'
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
            UPDATE keypool.request q SET status = 'done', response = complete_request.response,
                   error = NULL, finished_at = now(), claimed_by = NULL, claimed_role = NULL, lease_until = NULL
             WHERE q.id = r.id;
        WHEN 'failed' THEN
            UPDATE keypool.request q SET status = 'failed', error = complete_request.error,
                   finished_at = now(), claimed_by = NULL, claimed_role = NULL, lease_until = NULL
             WHERE q.id = r.id;
        WHEN 'retry', 'wait' THEN
            UPDATE keypool.request q SET status = 'queued', error = complete_request.error,
                   not_before = coalesce(retry_at, now()), claimed_by = NULL, claimed_role = NULL, lease_until = NULL,
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

-- When the next queued request of the pools named falls due or the next lease runs out.
CREATE FUNCTION keypool.queue_wake_at(pools text[])
RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, keypool, pg_temp AS $$
    SELECT least((SELECT min(r.not_before) FROM keypool.request r WHERE r.status = 'queued' AND r.pool = ANY (pools)),
                 (SELECT min(r.lease_until) FROM keypool.request r WHERE r.status = 'running' AND r.pool = ANY (pools)));
$$;

-- Written against the function-call interface (queue.rs, operations.rs): submit and complete
-- size their jsonb argument from its header before anything reads it; result and credentials
-- return a record.
CREATE FUNCTION keypool_submit(user_id text, pool text, request jsonb, max_wait interval DEFAULT '10 minutes',
                               max_attempts integer DEFAULT 3)
RETURNS bigint
AS 'MODULE_PATHNAME', 'keypool_submit_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION keypool_result(id bigint, OUT status text, OUT response jsonb, OUT error text)
RETURNS record
AS 'MODULE_PATHNAME', 'keypool_result_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION keypool_key_credentials(key_id bigint, OUT provider text, OUT model text, OUT base_url text,
                                        OUT secret text)
RETURNS record
AS 'MODULE_PATHNAME', 'keypool_key_credentials_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION keypool_complete_request(id bigint, worker text, outcome text, response jsonb DEFAULT NULL,
                                         error text DEFAULT NULL, retry_at timestamptz DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'keypool_complete_request_c'
LANGUAGE c VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION keypool.enqueue(regrole, text, text, jsonb, interval, integer) IS
    'Internal: enqueues a request for keypool_submit';
COMMENT ON FUNCTION keypool.claim_requests(regrole, text[], text, integer, interval) IS
    'Internal: claims due requests of the given pools for keypool_claim_requests';
COMMENT ON FUNCTION keypool.complete_request(regrole, bigint, text, text, jsonb, text, timestamptz) IS
    'Internal: records how a claimed request ended for keypool_complete_request';
COMMENT ON FUNCTION keypool.queue_wake_at(text[]) IS 'Internal: when the given pools'' queue next needs a worker';

REVOKE ALL ON FUNCTION
    keypool.enqueue(regrole, text, text, jsonb, interval, integer),
    keypool.claim_requests(regrole, text[], text, integer, interval),
    keypool.complete_request(regrole, bigint, text, text, jsonb, text, timestamptz),
    keypool.queue_wake_at(text[])
FROM PUBLIC;
