//! The SQL request queue with real workers: results, failures with their reasons, waiting for
//! capacity without spinning, attempts, two workers sharing the queue, a worker killed with
//! -9 mid-request, a graceful shutdown that returns unfinished work, and the documented grants.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use keypool_tests::{shared, TestDb};
use serde_json::Value;

/// (status, attempts, error) of every request, by id.
async fn requests(db: &TestDb<'_>) -> Vec<(i64, String, i32, String)> {
    db.client
        .query(
            "SELECT id, status, attempts, coalesce(error, '') FROM keypool_requests ORDER BY id",
            &[],
        )
        .await
        .expect("keypool_requests")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn wait_for_status(db: &TestDb<'_>, want: &str, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let row = db
            .client
            .query_one("SELECT count(*) FROM keypool_requests WHERE status = $1", &[&want])
            .await
            .expect("count");
        let got: i64 = row.get(0);
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} of {n} requests {want} after {within:?}: {:?}",
            requests(db).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit(db: &TestDb<'_>, user: &str, pool: &str, request: &str) -> i64 {
    db.client
        .query_one(
            "SELECT keypool_submit($1, $2, $3::text::jsonb)",
            &[&user, &pool, &request],
        )
        .await
        .unwrap_or_else(|e| panic!("keypool_submit: {e}"))
        .get(0)
}

const HELLO: &str = r#"{"messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 4}"#;

#[tokio::test(flavor = "multi_thread")]
async fn requests_end_done_or_failed_with_their_reason() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-queue-good-00000001', 'gpt-4o-mini', base_url => '{u}/v1');
             SELECT keypool_create_pool('rejected');
             SELECT keypool_add_key('rejected', 'openai', 'sk-queue-invalid-000002', base_url => '{u}/v1');
             SELECT keypool_create_pool('tight');
             SELECT keypool_add_key('tight', 'openai', 'sk-queue-tight-0000003', rpd => 2, base_url => '{u}/v1');
             SELECT keypool_assign('a', 'tight'), keypool_assign('b', 'tight');",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "queue-basic", &["--no-http"]).await;
    let done = submit(&db, "u1", "chat", HELLO).await;
    let rejected = submit(&db, "u1", "rejected", HELLO).await;
    let first = submit(&db, "a", "tight", HELLO).await;
    wait_for_status(&db, "done", 2, Duration::from_secs(20)).await;
    let over = submit(&db, "a", "tight", HELLO).await;
    wait_for_status(&db, "failed", 2, Duration::from_secs(20)).await;

    // The answer, in OpenAI's shape.
    let row = db
        .client
        .query_one("SELECT status, response, error FROM keypool_result($1)", &[&done])
        .await
        .expect("keypool_result");
    assert_eq!(row.get::<_, String>(0), "done");
    let response: Value = row.get(1);
    assert_eq!(response["choices"][0]["message"]["content"], "This is a mock");
    assert_eq!(response["usage"]["prompt_tokens"], 2);
    assert_eq!(row.get::<_, Option<String>>(2), None);

    let all = requests(&db).await;
    let of = |id: i64| all.iter().find(|r| r.0 == id).cloned().expect("request");
    // The only key was rejected and disabled: nothing left to try.
    let r = of(rejected);
    assert_eq!(r.1, "failed");
    assert!(r.3.contains("NO_KEYS") && r.3.contains("invalid_api_key"), "{r:?}");
    assert_eq!(of(first).1, "done");
    // Past the user's share: failed at once with that reason.
    let r = of(over);
    assert_eq!((r.1.as_str(), r.2), ("failed", 1));
    assert!(r.3.starts_with("QUOTA_EXCEEDED"), "{r:?}");
    // Three calls, and the check of the rejected key (its model list) before it was disabled.
    assert_eq!(mock.stats().await["requests"], 4);

    // Results are announced.
    let notices = w.log();
    assert!(
        notices.contains("queued request") && notices.contains("outcome=\"done\""),
        "{notices}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_pool_makes_requests_wait_without_spinning() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('slow');
             SELECT keypool_add_key('slow', 'openai', 'sk-queue-slow-00000001', rpm => 1, base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let _w = Worker::start(&conninfo(&db), "queue-wait", &["--no-http"]).await;
    submit(&db, "u1", "slow", HELLO).await;
    wait_for_status(&db, "done", 1, Duration::from_secs(20)).await;
    let waiting = submit(&db, "u2", "slow", HELLO).await;
    // Deadline before the window frees up: fails at once.
    let hopeless: i64 = db
        .client
        .query_one(
            "SELECT keypool_submit('u3', 'slow', $1::text::jsonb, max_wait => '2 seconds')",
            &[&HELLO],
        )
        .await
        .expect("submit")
        .get(0);
    wait_for_status(&db, "failed", 1, Duration::from_secs(20)).await;
    // A check that something does *not* happen (the waiting request is not claimed again and
    // again): it needs time to pass, and a slow machine can only make it pass, never fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let row = db
        .client
        .query_one(
            "SELECT status, attempts, error, extract(epoch FROM not_before - now())::float8
               FROM keypool_requests WHERE id = $1",
            &[&waiting],
        )
        .await
        .expect("waiting request");
    assert_eq!(row.get::<_, String>(0), "queued");
    assert_eq!(row.get::<_, i32>(1), 0, "waiting is not an attempt");
    assert!(row.get::<_, String>(2).starts_with("POOL_EXHAUSTED"));
    let due_in: f64 = row.get(3);
    assert!((10.0..=61.0).contains(&due_in), "due in {due_in} s");
    let hopeless_error = value(
        &db,
        &format!("SELECT error FROM keypool_requests WHERE id = {hopeless}"),
    )
    .await;
    assert!(
        hopeless_error
            .as_deref()
            .unwrap_or("")
            .contains("no capacity before the deadline"),
        "{hopeless_error:?}"
    );
    // The provider saw the first request only: nobody retried in a loop.
    assert_eq!(mock.stats().await["requests"], 1);

    // Capacity returns (the clock moves past the minute) and the request falls due: it is done.
    exec(
        &db,
        "SELECT keypool_set_clock(now() + interval '2 minutes');
         UPDATE keypool.request SET not_before = now() WHERE status = 'queued';
         SELECT pg_notify('keypool_requests', '');",
    )
    .await;
    wait_for_status(&db, "done", 2, Duration::from_secs(20)).await;
    assert_eq!(mock.stats().await["requests"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_failures_are_retried_up_to_max_attempts_then_fail() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('flaky');
             SELECT keypool_add_key('flaky', 'openai', 'sk-queue-down-00000001', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let _w = Worker::start(&conninfo(&db), "queue-retry", &["--no-http", "--max-attempts", "1"]).await;
    let id: i64 = db
        .client
        .query_one(
            "SELECT keypool_submit('u', 'flaky', $1::text::jsonb, max_attempts => 2)",
            &[&HELLO],
        )
        .await
        .expect("submit")
        .get(0);
    wait_for_status(&db, "failed", 1, Duration::from_secs(30)).await;
    let r = requests(&db).await.into_iter().find(|r| r.0 == id).expect("request");
    assert_eq!(r.2, 2);
    assert!(r.3.contains("503") && r.3.contains("after 2 attempts"), "{r:?}");
    assert_eq!(mock.stats().await["requests"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_queue_and_no_request_is_done_twice_or_lost() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&["--latency", "5ms"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-queue-share-' || i || '-000000', base_url => '{u}/v1')
               FROM generate_series(1, 3) i;",
            u = mock.url
        ),
    )
    .await;
    let args = ["--no-http", "--queue-concurrency", "4", "--heartbeat-interval", "200ms"];
    let mut a = Worker::start(&conninfo(&db), "share-a", &args).await;
    let mut b = Worker::start(&conninfo(&db), "share-b", &args).await;
    exec(
        &db,
        &format!("SELECT keypool_submit('user-' || i, 'chat', '{HELLO}'::jsonb) FROM generate_series(1, 300) i"),
    )
    .await;
    wait_for_status(&db, "done", 300, Duration::from_secs(90)).await;
    assert_eq!(a.terminate(Duration::from_secs(20)).await.code(), Some(0));
    assert_eq!(b.terminate(Duration::from_secs(20)).await.code(), Some(0));

    // One provider call per request: none was carried out twice.
    assert_eq!(mock.stats().await["requests"], 300);
    let all = requests(&db).await;
    assert_eq!(all.len(), 300);
    assert!(all.iter().all(|r| r.1 == "done" && r.2 == 1), "{all:?}");
    let ids: HashSet<String> = db
        .client
        .query("SELECT response->>'id' FROM keypool.request", &[])
        .await
        .expect("responses")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 300);
    let per_worker: Vec<(String, i64)> = db
        .client
        .query("SELECT id, queue_done FROM keypool_workers ORDER BY id", &[])
        .await
        .expect("workers")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_worker.len(), 2);
    assert_eq!(per_worker.iter().map(|w| w.1).sum::<i64>(), 300, "{per_worker:?}");
    assert!(
        per_worker.iter().all(|w| w.1 > 0),
        "both workers took part: {per_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_of_a_killed_worker_complete_on_another_after_the_lease() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&["--latency", "3s"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-queue-kill-00000001', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    let args = ["--no-http", "--queue-lease", "9s", "--provider-timeout", "4s"];
    let mut a = Worker::start(&conninfo(&db), "victim", &args).await;
    exec(
        &db,
        &format!("SELECT keypool_submit('user-' || i, 'chat', '{HELLO}'::jsonb) FROM generate_series(1, 3) i"),
    )
    .await;
    eventually(
        &db,
        "SELECT count(*) FROM keypool_requests WHERE status = 'running' AND claimed_by = 'victim'",
        "3",
    )
    .await;
    // The calls went out (the mock counts them on arrival) before the victim dies.
    mock.wait_for_requests(3).await;
    a.kill9();

    let _b = Worker::start(&conninfo(&db), "rescuer", &args).await;
    wait_for_status(&db, "done", 3, Duration::from_secs(60)).await;
    let all = requests(&db).await;
    assert!(all.iter().all(|r| r.1 == "done" && r.2 == 2), "{all:?}");
    // The victim's calls and the rescuer's.
    assert_eq!(mock.stats().await["requests"], 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_requests_in_flight_or_returns_them() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&["--latency", "1500ms"]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-queue-term-00000001', base_url => '{u}/v1');",
            u = mock.url
        ),
    )
    .await;
    // A grace period long enough: the request finishes.
    let mut w = Worker::start(&conninfo(&db), "patient", &["--no-http"]).await;
    submit(&db, "u1", "chat", HELLO).await;
    eventually(
        &db,
        "SELECT count(*) FROM keypool_requests WHERE status = 'running'",
        "1",
    )
    .await;
    assert!(w.terminate(Duration::from_secs(20)).await.success());
    assert_eq!(requests(&db).await[0].1, "done");

    // Too short: the request goes back to the queue, with its attempt not counted.
    let mut w = Worker::start(&conninfo(&db), "hasty", &["--no-http", "--shutdown-grace", "200ms"]).await;
    let id = submit(&db, "u2", "chat", HELLO).await;
    eventually(
        &db,
        "SELECT count(*) FROM keypool_requests WHERE status = 'running'",
        "1",
    )
    .await;
    assert!(w.terminate(Duration::from_secs(20)).await.success());
    let r = requests(&db).await.into_iter().find(|r| r.0 == id).expect("request");
    assert_eq!((r.1.as_str(), r.2), ("queued", 0), "{r:?}");
    assert!(r.3.contains("worker hasty stopped"), "{r:?}");
    assert!(w.log().contains("returned to the queue"), "{}", w.log());
    // And another worker finishes it.
    let _w = Worker::start(&conninfo(&db), "finisher", &["--no-http"]).await;
    wait_for_status(&db, "done", 2, Duration::from_secs(20)).await;
}

/// The book's Privileges grants are all a worker needs: a role with nothing else serves HTTP and the
/// queue, settles, and reports heartbeats; an app role with keypool_submit and keypool_result
/// enqueues and reads answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_runs_with_only_the_documented_grants() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    let (worker_role, app_role) = (format!("{}_worker", db.name), format!("{}_app", db.name));
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-grants-key-00000001', 'gpt-4o-mini', base_url => '{u}/v1');
             DROP ROLE IF EXISTS {worker_role}; DROP ROLE IF EXISTS {app_role};
             CREATE ROLE {worker_role} LOGIN; CREATE ROLE {app_role} LOGIN;
             GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]), keypool_reserve(text, text, bigint, text[], bytea),
                 keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint),
                 keypool_release(bigint), keypool_models(), keypool_claim_requests(text, integer, interval),
                 keypool_complete_request(bigint, text, text, jsonb, text, timestamptz), keypool_queue_wake_at(),
                 keypool_worker_heartbeat(text, text, text, integer, timestamptz, bigint, bigint, bigint),
                 keypool_worker_stopped(text)
               TO {worker_role};
             GRANT EXECUTE ON FUNCTION keypool_submit(text, text, jsonb, interval, integer), keypool_result(bigint)
               TO {app_role};
             SELECT keypool_grant('chat', '{worker_role}', 'use');
             SELECT keypool_grant('chat', '{app_role}', 'use');",
            u = mock.url
        ),
    )
    .await;
    let as_worker = conninfo(&db).replace("user=postgres", &format!("user={worker_role}"));
    let w = Worker::start(&as_worker, "grants", &["--heartbeat-interval", "200ms"]).await;

    let r = w
        .chat(serde_json::json!({"model": "chat", "user": "u1", "messages": user_message("abcdefgh"), "max_tokens": 4}))
        .await;
    assert_eq!(r.status(), 200, "{}", w.log());

    let app = keypool_tests::connect(&conninfo(&db).replace("user=postgres", &format!("user={app_role}")))
        .await
        .expect("connect as the app role");
    let id: i64 = app
        .query_one("SELECT keypool_submit('u2', 'chat', $1::text::jsonb)", &[&HELLO])
        .await
        .expect("keypool_submit as the app role")
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = app
            .query_one("SELECT status, response FROM keypool_result($1)", &[&id])
            .await
            .expect("keypool_result as the app role");
        if row.get::<_, String>(0) == "done" {
            let response: Value = row.get(1);
            assert_eq!(response["choices"][0]["message"]["content"], "This is a mock");
            break;
        }
        assert!(Instant::now() < deadline, "request {id} not done:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both calls were settled (as the worker role) and the heartbeat was recorded.
    eventually(&db, "SELECT sum(requests_today) FROM keypool_scopes", "2").await;
    eventually(
        &db,
        "SELECT served || ' served, ' || queue_done || ' from the queue' FROM keypool_workers WHERE id = 'grants'",
        "2 served, 1 from the queue",
    )
    .await;
    // A clean stop is recorded, so the worker is not reported missing.
    let mut w = w;
    assert!(w.terminate(Duration::from_secs(30)).await.success());
    assert_eq!(
        value(
            &db,
            "SELECT stopped_at IS NOT NULL FROM keypool_workers WHERE id = 'grants'"
        )
        .await
        .as_deref(),
        Some("t")
    );
    assert!(!w.log().contains("permission denied"), "{}", w.log());
    drop(w);
    exec(
        &db,
        &format!("DROP OWNED BY {worker_role}, {app_role}; DROP ROLE {worker_role}; DROP ROLE {app_role};"),
    )
    .await;
}
