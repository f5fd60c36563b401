//! The reservation engine seen from real client sessions: exactness under concurrency, outcomes
//! that move traffic, configuration changes reaching every session, isolation between databases.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keypool_tests::{exec, shared, TestDb};

/// Reserves from `pool` on `sessions` connections, each `per_session` times, and returns how
/// many were granted per key id.
async fn hammer(
    db: &TestDb<'_>,
    pool: &str,
    est_tokens: i64,
    sessions: usize,
    per_session: usize,
) -> HashMap<i64, u64> {
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let client = db.connect().await;
        let pool = pool.to_string();
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("SELECT granted, key_id FROM keypool_reserve($1, $2, $3)")
                .await
                .expect("prepare");
            let mut granted: HashMap<i64, u64> = HashMap::new();
            for i in 0..per_session {
                let user = format!("user-{s}-{i}");
                let row = client
                    .query_one(&stmt, &[&user, &pool, &est_tokens])
                    .await
                    .expect("reserve");
                if row.get::<_, bool>(0) {
                    *granted.entry(row.get::<_, i64>(1)).or_default() += 1;
                }
            }
            granted
        }));
    }
    let mut total: HashMap<i64, u64> = HashMap::new();
    for t in tasks {
        for (k, n) in t.await.expect("session task") {
            *total.entry(k).or_default() += n;
        }
    }
    total
}

fn sum(m: &HashMap<i64, u64>) -> u64 {
    m.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_sessions_grant_exactly_the_limits() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_create_pool('requests');
         SELECT keypool_add_key('requests', 'openai', 'sk-hot-requests-000001', rpm => 25, rpd => 1000);
         SELECT keypool_create_pool('tokens');
         SELECT keypool_add_key('tokens', 'openai', 'sk-hot-tokens-0000001', tpm => 1000);
         SELECT keypool_create_pool('daily');
         SELECT keypool_add_key('daily', 'gemini', 'AIzaSy-hot-daily-00001', 'gemini-2.5-flash', rpd => 40);
         SELECT keypool_create_pool('shared');
         SELECT keypool_add_key('shared', 'gemini', 'AIzaSy-hot-project-' || i || '-000', 'gemini-2.5-pro',
                                account => 'one-project', rpm => 30)
           FROM generate_series(1, 3) i;",
    )
    .await;
    // Far more attempts than capacity, all within one minute.
    assert_eq!(
        sum(&hammer(&db, "requests", 0, 64, 20).await),
        25,
        "requests per minute"
    );
    assert_eq!(
        sum(&hammer(&db, "tokens", 30, 64, 20).await),
        1000 / 30,
        "tokens per minute (30 each)"
    );
    assert_eq!(sum(&hammer(&db, "daily", 0, 64, 20).await), 40, "requests per day");
    // Three keys of one project share its 30 requests per minute, spread over all three.
    let shared_grants = hammer(&db, "shared", 0, 64, 20).await;
    assert_eq!(sum(&shared_grants), 30, "a shared account's limit counts once");
    assert_eq!(
        shared_grants.len(),
        3,
        "every key of the account was used: {shared_grants:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_minute_window_grants_exactly_its_limit_under_concurrency() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_set_clock('2031-03-03 12:00:00+00');
         SELECT keypool_create_pool('w');
         SELECT keypool_add_key('w', 'xai', 'xai-window-key-00000001', 'grok-4', rpm => 12, tpm => 6000);",
    )
    .await;
    assert_eq!(sum(&hammer(&db, "w", 500, 64, 5).await), 12);
    // Half a minute later nothing has left the window.
    exec(&db.client, "SELECT keypool_set_clock('2031-03-03 12:00:30+00')").await;
    assert_eq!(sum(&hammer(&db, "w", 0, 64, 5).await), 0);
    // A minute after the first grants, the window holds exactly one limit's worth again.
    exec(&db.client, "SELECT keypool_set_clock('2031-03-03 12:01:00+00')").await;
    assert_eq!(sum(&hammer(&db, "w", 500, 64, 5).await), 12);
    exec(&db.client, "SELECT keypool_set_clock('2031-03-03 12:02:00+00')").await;
    assert_eq!(sum(&hammer(&db, "w", 0, 64, 5).await), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limited_key_is_skipped_until_its_retry_after() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_create_pool('rl');
         SELECT keypool_add_key('rl', 'openai', 'sk-rl-key-' || i || '-00000000', account => 'org-' || i)
           FROM generate_series(1, 3) i;",
    )
    .await;
    // A frozen clock: the cooldown ends when the test says, however slow the machine is.
    exec(&db.client, "SELECT keypool_set_clock('2031-03-03 12:00:00+00')").await;
    let row = db
        .client
        .query_one("SELECT reservation_id, key_id FROM keypool_reserve('u', 'rl')", &[])
        .await
        .unwrap();
    let (reservation, limited): (i64, i64) = (row.get(0), row.get(1));
    let outcome: String = db
        .client
        .query_one(
            "SELECT keypool_settle($1, 429, retry_after_ms => 1500, error_code => 'rate_limit_exceeded')",
            &[&reservation],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "rate_limited");
    // While it cools, 16 sessions never get that key, and every request is still served.
    let during = hammer(&db, "rl", 0, 16, 10).await;
    assert_eq!(sum(&during), 160);
    assert!(
        !during.contains_key(&limited),
        "the rate-limited key was handed out: {during:?}"
    );
    exec(&db.client, "SELECT keypool_set_clock('2031-03-03 12:00:01.499+00')").await;
    let still = hammer(&db, "rl", 0, 4, 6).await;
    assert!(
        !still.contains_key(&limited),
        "the key came back before its retry-after: {still:?}"
    );
    exec(&db.client, "SELECT keypool_set_clock('2031-03-03 12:00:01.6+00')").await;
    let after = hammer(&db, "rl", 0, 4, 6).await;
    assert!(
        after.get(&limited).copied().unwrap_or(0) > 0,
        "the key did not come back: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthorized_key_is_disabled_for_every_session() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_create_pool('auth');
         SELECT keypool_add_key('auth', 'openai', 'sk-auth-key-' || i || '-0000000') FROM generate_series(1, 2) i;",
    )
    .await;
    // Other sessions have the configuration cached already.
    let before = hammer(&db, "auth", 0, 8, 4).await;
    assert_eq!(before.len(), 2);
    let row = db
        .client
        .query_one("SELECT reservation_id, key_id FROM keypool_reserve('u', 'auth')", &[])
        .await
        .unwrap();
    let (reservation, bad): (i64, i64) = (row.get(0), row.get(1));
    let outcome: String = db
        .client
        .query_one(
            "SELECT keypool_settle($1, 401, error_code => 'invalid_api_key')",
            &[&reservation],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "key_invalid");
    let after = hammer(&db, "auth", 0, 8, 10).await;
    assert_eq!(sum(&after), 80);
    assert!(!after.contains_key(&bad), "a disabled key was handed out: {after:?}");
    let row = db
        .client
        .query_one("SELECT state, reason FROM keypool_keys WHERE key_id = $1", &[&bad])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "disabled");
    assert_eq!(row.get::<_, String>(1), "HTTP 401 invalid_api_key");
}

#[tokio::test]
async fn a_transaction_with_an_old_snapshot_still_reserves_by_the_newest_configuration() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_create_pool('snap');
         SELECT keypool_add_key('snap', 'openai', 'sk-snapshot-key-0000001');",
    )
    .await;
    let mut reader = db.connect().await;
    let tx = reader
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    assert!(tx
        .query_one("SELECT granted FROM keypool_reserve('u', 'snap')", &[])
        .await
        .unwrap()
        .get::<_, bool>(0));
    exec(
        &db.client,
        "SELECT keypool_disable_key(key_id, 'leaked') FROM keypool_keys WHERE pool = 'snap'",
    )
    .await;
    // The transaction's snapshot predates the change; the key must be out anyway.
    let row = tx
        .query_one("SELECT granted, error FROM keypool_reserve('u', 'snap')", &[])
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "NO_KEYS");
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transactions_adding_keys_do_not_take_each_others_slots() {
    // Two transactions add pools and keys (their ids interleaved) and reserve at the same time
    // before committing. Neither sees the other's rows, so to each the other's unused slots look
    // like rows that are gone; taking them back makes the other reload and take back in turn.
    let db = shared().fresh_db().await;
    let mut first = db.connect().await;
    let mut second = db.connect().await;
    let a = first.transaction().await.unwrap();
    let b = second.transaction().await.unwrap();
    for i in 0..40 {
        for (tx, pool) in [(&a, "first"), (&b, "second")] {
            if i == 0 {
                tx.batch_execute(&format!("SELECT keypool_create_pool('{pool}')"))
                    .await
                    .unwrap();
            }
            tx.batch_execute(&format!(
                "SELECT keypool_add_key('{pool}', 'openai', 'sk-open-{pool}-{i}-000000', account => '{pool}-{}')",
                i % 20
            ))
            .await
            .unwrap();
        }
    }
    // A third session's changes make both reload their configuration again and again.
    let churn = async {
        for _ in 0..100 {
            exec(&db.client, "BEGIN; SELECT keypool_create_pool('churn'); ROLLBACK").await;
        }
    };
    let (a, b, ()) = tokio::join!(reserve_in(a, "first", 200), reserve_in(b, "second", 200), churn);
    assert_eq!((a, b), (200, 200));
}

/// Reserves `n` times in `pool` inside `tx`, for a new user each time; commits; returns grants.
async fn reserve_in(tx: tokio_postgres::Transaction<'_>, pool: &str, n: usize) -> usize {
    let mut granted = 0;
    for i in 0..n {
        let row = tx
            .query_one(
                "SELECT granted FROM keypool_reserve($1, $2)",
                &[&format!("u{i}"), &pool],
            )
            .await
            .unwrap_or_else(|e| panic!("reserve {i} in {pool}: {e:?}"));
        granted += row.get::<_, bool>(0) as usize;
    }
    tx.commit().await.unwrap();
    granted
}

#[tokio::test]
async fn a_recreated_extension_does_not_inherit_rate_windows() {
    let db = shared().fresh_db().await;
    let setup = "SELECT keypool_create_pool('again');
                 SELECT keypool_add_key('again', 'openai', 'sk-again-key-00000001', rpm => 1);";
    exec(&db.client, setup).await;
    let other = db.connect().await;
    let reserve = "SELECT granted FROM keypool_reserve('u', 'again')";
    assert!(other.query_one(reserve, &[]).await.unwrap().get::<_, bool>(0));
    assert!(!other.query_one(reserve, &[]).await.unwrap().get::<_, bool>(0));
    exec(
        &db.client,
        "DROP EXTENSION pg_keypool CASCADE; CREATE EXTENSION pg_keypool;",
    )
    .await;
    exec(&db.client, setup).await;
    // The same ids again, but a new installation: its key starts with an empty window, also in
    // a session that had the old configuration cached.
    assert!(other.query_one(reserve, &[]).await.unwrap().get::<_, bool>(0));
    assert!(!other.query_one(reserve, &[]).await.unwrap().get::<_, bool>(0));
}

#[tokio::test]
async fn databases_do_not_share_rate_windows() {
    let a = shared().fresh_db().await;
    let b = shared().fresh_db().await;
    let setup = "SELECT keypool_create_pool('iso');
                 SELECT keypool_add_key('iso', 'openai', 'sk-isolated-key-00001', rpm => 2);";
    exec(&a.client, setup).await;
    exec(&b.client, setup).await;
    // Same pool, same key id, same secret: two installations, two budgets.
    assert_eq!(sum(&hammer(&a, "iso", 0, 4, 3).await), 2);
    assert_eq!(sum(&hammer(&b, "iso", 0, 4, 3).await), 2);
}

#[tokio::test]
async fn secrets_stay_out_of_errors_and_the_server_log() {
    let cluster = shared();
    let db = cluster.fresh_db().await;
    let secret = "sk-proj-TOPSECRET-do-not-log-0042";
    exec(&db.client, "SELECT keypool_create_pool('hush')").await;
    db.client
        .execute("SELECT keypool_add_key('hush', 'openai', $1, rpm => 5)", &[&secret])
        .await
        .expect("add key");
    // Errors about that key, with the secret passed as a parameter, never echo it.
    for sql in [
        "SELECT keypool_add_key('hush', 'openai', $1, rpm => 0)",
        "SELECT keypool_add_key('nope', 'openai', $1)",
        "SELECT keypool_add_key('hush', 'bogus', $1)",
    ] {
        let err = db.client.execute(sql, &[&secret]).await.expect_err(sql);
        let db_err = err.as_db_error().expect("a server error");
        let text = format!("{} {:?} {:?}", db_err.message(), db_err.detail(), db_err.hint());
        assert!(!text.contains("TOPSECRET"), "{text}");
    }
    // A worker passing a provider message that contains the key: the reason shows the label.
    let r: i64 = db
        .client
        .query_one("SELECT reservation_id FROM keypool_reserve('u', 'hush')", &[])
        .await
        .unwrap()
        .get(0);
    db.client
        .execute(
            "SELECT keypool_settle($1, 401, error_code => $2)",
            &[&r, &format!("Incorrect API key provided: {secret}")],
        )
        .await
        .unwrap();
    let reason: String = db
        .client
        .query_one("SELECT reason FROM keypool_keys WHERE pool = 'hush'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !reason.contains("TOPSECRET") && reason.contains("sk-proj-…0042"),
        "{reason}"
    );
    for view in ["keypool_keys", "keypool_scopes", "keypool_events", "keypool_usage"] {
        let n: i64 = db
            .client
            .query_one(
                &format!("SELECT count(*) FROM {view} v WHERE row_to_json(v)::text LIKE '%TOPSECRET%'"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{view} shows the secret");
    }
    assert!(
        !cluster.log().contains("TOPSECRET"),
        "the server log contains the secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_the_hourly_history_in_the_background() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_create_pool('bg');
         SELECT keypool_add_key('bg', 'openai', 'sk-background-flush-01');
         SELECT keypool_settle((keypool_reserve('u' || i, 'bg')).reservation_id, 200, 10, 5) FROM generate_series(1, 7) i;",
    )
    .await;
    // The launcher starts a flusher in this database (pg_keypool.flush_interval = 10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = db
            .client
            .query_one(
                "SELECT coalesce(sum(requests), 0)::bigint, coalesce(sum(prompt_tokens), 0)::bigint FROM keypool_usage",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 7 {
            assert_eq!(row.get::<_, i64>(1), 70);
            break;
        }
        assert!(Instant::now() < deadline, "usage was not flushed within 30 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn roles_with_readme_grants_can_reserve_but_never_read_the_secrets() {
    let cluster = shared();
    let db = cluster.fresh_db().await;
    let suffix = &db.name;
    exec(
        &db.client,
        &format!(
            "SELECT keypool_create_pool('roles');
             SELECT keypool_add_key('roles', 'openai', 'sk-roles-key-00000001');
             CREATE ROLE app_{suffix} LOGIN;
             GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]),
                                       keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint),
                                       keypool_release(bigint) TO app_{suffix};
             CREATE ROLE ops_{suffix} LOGIN;
             GRANT SELECT ON keypool_keys, keypool_scopes, keypool_usage, keypool_events TO ops_{suffix};
             GRANT SELECT ON keypool_pool_stats, keypool_members, keypool_key_stats, keypool_alerts, keypool_health,
                             keypool_prices TO ops_{suffix};
             GRANT EXECUTE ON FUNCTION keypool.scope_state(), keypool.key_state(), keypool.pool_state(), keypool.health(),
                                       keypool_now(), keypool_usage_report(date, date) TO ops_{suffix};
             GRANT USAGE ON SCHEMA keypool TO ops_{suffix};
             SELECT keypool_grant('roles', 'app_{suffix}', 'use');
             SELECT keypool_grant('roles', 'ops_{suffix}', 'read');"
        ),
    )
    .await;
    let as_role = |role: String| {
        let conninfo = cluster
            .conninfo(&db.name)
            .replace("user=postgres", &format!("user={role}"));
        async move { keypool_tests::connect(&conninfo).await.expect("connect as role") }
    };
    let app = as_role(format!("app_{suffix}")).await;
    let row = app
        .query_one("SELECT reservation_id, secret FROM keypool_reserve('u', 'roles')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(1), "sk-roles-key-00000001");
    let outcome: String = app
        .query_one("SELECT keypool_settle($1, 200, 3, 4)", &[&row.get::<_, i64>(0)])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "success");
    for sql in [
        "SELECT secret_sealed FROM keypool.key",
        "SELECT * FROM keypool_keys",
        "SELECT keypool_add_key('roles', 'openai', 'sk-smuggled-000000001')",
        "SELECT keypool_disable_key(1, 'x')",
    ] {
        let err = app.query(sql, &[]).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err:?}");
    }
    let ops = as_role(format!("ops_{suffix}")).await;
    let state: String = ops
        .query_one("SELECT state FROM keypool_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "active");
    let used: i64 = ops
        .query_one("SELECT requests_this_minute FROM keypool_scopes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(used, 1);
    // The book's ops grants (Privileges) open every stats view and the usage report.
    for sql in [
        "SELECT count(*) FROM keypool_key_stats",
        "SELECT count(*) FROM keypool_pool_stats",
        "SELECT count(*) FROM keypool_alerts",
        "SELECT count(*) FROM keypool_health",
        "SELECT count(*) FROM keypool_events",
        "SELECT count(*) FROM keypool_members",
        "SELECT count(*) FROM keypool_usage",
        "SELECT count(*) FROM keypool_prices",
        "SELECT count(*) FROM keypool_usage_report(current_date - 1, current_date)",
    ] {
        let n: i64 = ops
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql} as ops: {e:?}"))
            .get(0);
        assert!(n >= 0);
    }
    let status: String = ops
        .query_one("SELECT status FROM keypool_health", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "EXCELLENT");
    let err = ops
        .query("SELECT secret_sealed FROM keypool.key", &[])
        .await
        .expect_err("ops reads secrets");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"));
}
