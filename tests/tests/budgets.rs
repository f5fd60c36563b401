//! Spend budgets (issue 14) from real sessions: exact under concurrency, run after run; settles
//! that cost less free the difference; spend survives a clean restart and a crash.

use keypool_tests::{exec, one, shared, zone_at_noon, Cluster, TestDb};
use tokio_postgres::Client;

/// Reserves `total` times (5,000 tokens each) from `sessions` concurrent connections; returns
/// the granted reservation ids.
async fn reserve_concurrently(db: &TestDb<'_>, pool: &str, sessions: usize, total: usize) -> Vec<i64> {
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let client = db.connect().await;
        let pool = pool.to_string();
        // 200 over 32 sessions: 6 or 7 each.
        let n = total / sessions + usize::from(s < total % sessions);
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("SELECT granted, reservation_id, error FROM keypool_reserve($1, $2, 5000)")
                .await
                .expect("prepare");
            let mut ids = Vec::new();
            for i in 0..n {
                let row = client
                    .query_one(&stmt, &[&format!("user-{s}-{i}"), &pool])
                    .await
                    .expect("reserve");
                if row.get::<_, bool>(0) {
                    ids.push(row.get::<_, i64>(1));
                } else {
                    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("BUDGET_EXCEEDED"));
                }
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("session task"));
    }
    ids
}

async fn spent(client: &Client, pool: &str) -> String {
    let v: Option<String> = one(
        client,
        &format!("SELECT spent::text FROM keypool_pool_stats WHERE pool = '{pool}'"),
    )
    .await;
    v.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_sessions_never_spend_more_than_the_budget() {
    let db = shared().fresh_db().await;
    // 1.00 per million input tokens, 2.00 per million output: 5,000 tokens hold 0.01.
    exec(
        &db.client,
        "SELECT keypool_set_price('openai', 'budget-model', 1.00, 2.00)",
    )
    .await;
    for run in 0..5 {
        let pool = format!("budget-{run}");
        exec(
            &db.client,
            &format!(
                "SELECT keypool_create_pool('{pool}', timezone => '{zone}');
                 SELECT keypool_add_key('{pool}', 'openai', 'sk-budget-run-{run}-000000', 'budget-model');
                 SELECT keypool_add_key('{pool}', 'openai', 'sk-budget-run-{run}-111111', 'budget-model');
                 SELECT keypool_set_budget('{pool}', 1.00, 'day');",
                zone = zone_at_noon()
            ),
        )
        .await;
        let granted = reserve_concurrently(&db, &pool, 32, 200).await;
        assert_eq!(granted.len(), 100, "run {run}: 100 x 0.01 is the whole 1.00");
        assert_eq!(spent(&db.client, &pool).await, "1.000000");

        // Twenty calls cost 0.003 each (1,000 tokens in, 1,000 out): 20 x 0.007 = 0.14 is free
        // again, room for exactly 14 more.
        for id in &granted[..20] {
            exec(&db.client, &format!("SELECT keypool_settle({id}, 200, 1000, 1000)")).await;
        }
        assert_eq!(spent(&db.client, &pool).await, "0.860000");
        let more = reserve_concurrently(&db, &pool, 32, 100).await;
        assert_eq!(more.len(), 14, "run {run}");
        assert_eq!(spent(&db.client, &pool).await, "1.000000");
    }
}

#[tokio::test]
async fn spend_survives_a_clean_restart_and_a_crash() {
    // Only the state this test saves itself is on disk.
    let cluster = Cluster::start(
        "budget-restart",
        &["pg_keypool.state_save_interval = '1h'", "restart_after_crash = on"],
    );
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        &format!(
            "CREATE EXTENSION pg_keypool;
             SELECT keypool_set_price('openai', 'budget-model', 0, 0, 0.01);
             SELECT keypool_create_pool('p', timezone => '{}');
             SELECT keypool_add_key('p', 'openai', 'sk-budget-restart-000001', 'budget-model');
             SELECT keypool_set_budget('p', 1.00, 'day', per_user => 0.05);",
            zone_at_noon()
        ),
    )
    .await;
    let reserve = |user: &'static str, n: usize| {
        format!("SELECT count(*) FILTER (WHERE (r).granted) FROM (SELECT keypool_reserve('{user}', 'p') r FROM generate_series(1, {n})) s")
    };
    // alice spends her 0.05; ten others 0.45 between them.
    assert_eq!(one::<i64>(&client, &reserve("alice", 6)).await, 5);
    for u in 0..9 {
        let n: i64 = one(
            &client,
            &format!("SELECT count(*) FILTER (WHERE (r).granted) FROM (SELECT keypool_reserve('u{u}', 'p') r FROM generate_series(1, 5)) s"),
        )
        .await;
        assert_eq!(n, 5);
    }
    assert_eq!(spent(&client, "p").await, "0.500000");
    drop(client);

    cluster.restart();
    let client = cluster.connect("postgres").await;
    assert_eq!(spent(&client, "p").await, "0.500000", "a clean restart keeps the spend");
    assert_eq!(one::<i64>(&client, &reserve("alice", 1)).await, 0, "and alice's");
    assert_eq!(one::<i64>(&client, &reserve("bob", 5)).await, 5);
    assert_eq!(spent(&client, "p").await, "0.550000");

    // What the flusher and the state file last wrote comes back after a crash.
    exec(&client, "SELECT keypool_flush(); SELECT keypool_save_state();").await;
    let victim = cluster.connect("postgres").await;
    let pid: i32 = one(&victim, "SELECT pg_backend_pid()").await;
    let client = cluster.crash_backend("postgres", pid, &client).await;
    assert_eq!(
        one::<String>(&client, "SELECT started_from FROM keypool_status()").await,
        "saved state (after a crash; unknown usage assumed)"
    );
    assert_eq!(spent(&client, "p").await, "0.550000", "the spend after a crash");
    assert_eq!(
        one::<i64>(&client, &reserve("alice", 1)).await,
        0,
        "alice's after a crash"
    );
    assert_eq!(one::<i64>(&client, &reserve("bob", 1)).await, 0, "bob's after a crash");
    // The pool's budget still binds: 0.45 left.
    let granted: i64 = one(
        &client,
        "SELECT count(*) FILTER (WHERE (r).granted) FROM (SELECT keypool_reserve('carol-' || i, 'p') r FROM generate_series(1, 100) i) s",
    )
    .await;
    assert_eq!(granted, 45);
    assert_eq!(spent(&client, "p").await, "1.000000");
}
