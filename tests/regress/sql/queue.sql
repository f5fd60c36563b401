-- The SQL request queue, as workers and apps use it, and the small functions the worker needs.
SELECT keypool_create_pool('q') > 0 AS created;
SELECT keypool_add_key('q', 'openai', 'sk-queue-regress-0001', 'gpt-4o-mini') AS q_key \gset

-- Submitting: bad input is refused with a SQLSTATE and changes nothing.
SELECT try($$SELECT keypool_submit('', 'q', '{"messages": [{"role": "user", "content": "hi"}]}')$$);
SELECT try($$SELECT keypool_submit('u', 'nope', '{"messages": [{"role": "user", "content": "hi"}]}')$$);
SELECT try($$SELECT keypool_submit('u', 'q', '{"prompt": "hi"}')$$);
SELECT try($$SELECT keypool_submit('u', 'q', '{"messages": []}')$$);
SELECT try($$SELECT keypool_submit('u', 'q', '[1, 2]')$$);
SELECT try($$SELECT keypool_submit('u', 'q', '{"messages": [{}]}', max_wait => '-1 second')$$);
SELECT try($$SELECT keypool_submit('u', 'q', '{"messages": [{}]}', max_attempts => 0)$$);
SELECT count(*) AS requests FROM keypool_requests;

-- Three requests (each NOTIFYs keypool_requests; the worker tests show workers waking up).
SELECT keypool_submit('u' || i, 'q', '{"messages": [{"role": "user", "content": "hi"}]}', max_attempts => 2) AS id
  FROM generate_series(1, 3) i;
SELECT id, user_id, pool, status, attempts, max_attempts FROM keypool_requests ORDER BY id;
SELECT keypool_queue_wake_at() <= now() AS something_is_due;

-- Worker a claims two; worker b gets the third, never the same ones.
SELECT id, user_id, attempts FROM keypool_claim_requests('a', 2, '5 minutes') ORDER BY id;
SELECT id, user_id, attempts FROM keypool_claim_requests('b', 5, '5 minutes') ORDER BY id;
SELECT count(*) AS nothing_left FROM keypool_claim_requests('b', 5, '5 minutes');
SELECT id, status, claimed_by FROM keypool_requests ORDER BY id;

-- Done: the answer is there for keypool_result; only the claiming worker may complete.
SELECT keypool_complete_request(1, 'b', 'done', '{"choices": []}') AS by_the_wrong_worker;
SELECT keypool_complete_request(1, 'a', 'done', '{"choices": [{"message": {"content": "hello"}}]}') AS done;
SELECT status, response -> 'choices' -> 0 -> 'message' ->> 'content' AS content, error FROM keypool_result(1);
SELECT keypool_complete_request(1, 'a', 'failed', NULL, 'late') AS completed_twice;

-- Retry counts an attempt; at max_attempts the request fails with its last error.
SELECT keypool_complete_request(2, 'a', 'retry', NULL, 'HTTP 503 from every key', now()) AS retried;
SELECT id, status, attempts, error FROM keypool_requests WHERE id = 2;
SELECT id, attempts FROM keypool_claim_requests('a', 5, '5 minutes');
SELECT keypool_complete_request(2, 'a', 'retry', NULL, 'HTTP 503 from every key', now());
SELECT * FROM keypool_result(2);

-- Waiting for capacity does not count an attempt, until the deadline.
SELECT keypool_complete_request(3, 'b', 'wait', NULL, 'POOL_EXHAUSTED', now() + interval '1 minute') AS waits;
SELECT id, status, attempts, error, not_before > now() AS later FROM keypool_requests WHERE id = 3;
SELECT count(*) AS not_yet_due FROM keypool_claim_requests('a', 5, '5 minutes');
UPDATE keypool.request SET not_before = now() WHERE id = 3;
SELECT id, attempts FROM keypool_claim_requests('a', 5, '5 minutes');
SELECT keypool_complete_request(3, 'a', 'wait', NULL, 'POOL_EXHAUSTED', now() + interval '1 day');
SELECT status, regexp_replace(error, '\(.*\)', '(deadline)') AS error FROM keypool_result(3);
SELECT try($$SELECT keypool_complete_request(3, 'a', 'maybe')$$);

-- A worker that stops answering: its lease runs out and another worker takes the request; at
-- max_attempts the request fails instead.
SELECT keypool_submit('u4', 'q', '{"messages": [{"role": "user", "content": "hi"}]}', max_attempts => 2) AS id;
SELECT id, attempts FROM keypool_claim_requests('crashed', 1, '0 seconds');
SELECT pg_sleep(0.01);
SELECT id, attempts FROM keypool_claim_requests('rescuer', 1, '0 seconds');
SELECT pg_sleep(0.01);
SELECT count(*) AS claimed FROM keypool_claim_requests('rescuer', 1, '5 minutes');
SELECT * FROM keypool_result(4);
SELECT try($$SELECT * FROM keypool_result(999)$$);
SELECT keypool_queue_wake_at() IS NULL AS nothing_pending;

-- Heartbeats.
SELECT keypool_worker_heartbeat('w1', '0.1.0', 'host-1', 42, now(), 10, 1, 3);
SELECT keypool_worker_heartbeat('w1', '0.1.0', 'host-1', 42, now(), 12, 1, 4);
SELECT id, version, host, pid, served, failed, queue_done, silent_for < interval '1 minute' AS alive FROM keypool_workers;

-- What the worker needs besides: pools and models (no secrets), a key's credentials for
-- validate, and the outcome class of an answer.
SELECT keypool_create_pool('keyless') > 0 AS created;
SELECT * FROM keypool_models() WHERE pool IN ('q', 'keyless');
SELECT provider, model, base_url, secret FROM keypool_key_credentials(:q_key);
SELECT try($$SELECT * FROM keypool_key_credentials(-1)$$);
SELECT s.status, s.code, keypool_classify(s.status, s.code)
  FROM (VALUES (200, NULL), (429, 'rate_limit_exceeded'), (429, 'GenerateRequestsPerDayPerProjectPerModel-FreeTier'),
               (401, 'invalid_api_key'), (400, 'API_KEY_INVALID'), (429, 'insufficient_quota'), (503, NULL),
               (0, NULL), (400, 'context_length_exceeded'), (499, 'client_closed_request')) s(status, code);
SELECT try($$SELECT keypool_classify(NULL)$$);

-- Keys may ask for their group number (import-env keeps XAI_API_KEY_n in group n).
SELECT keypool_add_key('q', 'openai', 'sk-queue-regress-0007', group_no => 7) AS k7 \gset
SELECT regexp_replace(try($$SELECT keypool_add_key('q', 'openai', 'sk-queue-regress-0008', group_no => 7)$$), '[0-9]+$', 'K');
SELECT try($$SELECT keypool_add_key('q', 'openai', 'sk-queue-regress-0009', group_no => 0)$$);
SELECT keypool_add_key('q', 'openai', 'sk-queue-regress-0010') > :k7 AS added;
SELECT keypool_add_key('q', 'openai', 'sk-queue-regress-0007', group_no => 3) = :k7 AS same_key_same_group;
SELECT group_no, label FROM keypool_keys WHERE pool = 'q' ORDER BY group_no;
