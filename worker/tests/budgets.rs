//! Spend budgets through the worker (issue 14): a used-up budget is a 429 with the wait until
//! the period resets, the user API shows spend and budget, and queued requests fail at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keypool_tests::{one, shared};
use serde_json::{json, Value};

fn hello(user: &str) -> Value {
    json!({"model": "paid", "user": user, "messages": user_message("hello"), "max_tokens": 3})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_budget_is_a_429_until_the_period_resets() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    // 0.01 a request; the pool may spend 0.03 a day, each user 0.02.
    exec(
        &db,
        &format!(
            "SELECT keypool_set_price('openai', 'budget-model', 0, 0, 0.01);
             SELECT keypool_create_pool('paid');
             SELECT keypool_add_key('paid', 'openai', 'sk-budget-worker-000001', 'budget-model', base_url => '{u}/v1');
             SELECT keypool_set_budget('paid', 0.03, 'day', per_user => 0.02);",
            u = mock.url
        ),
    )
    .await;
    let w = Worker::start(&conninfo(&db), "budget", &[]).await;

    for _ in 0..2 {
        assert_eq!(w.chat(hello("alice")).await.status(), 200);
    }
    // Alice's 0.02 is spent: 429, with the wait until midnight.
    let r = w.chat(hello("alice")).await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=86_400).contains(&wait), "{wait}");
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["error"]["code"], "BUDGET_EXCEEDED", "{v}");
    assert_eq!(mock.calls_with("sk-budget-worker-000001").await, 2);

    // The user API shows her spend and budget.
    let daily: Value = http()
        .get(format!("{}/allocation/daily?model=paid&user=alice", w.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("daily")
        .json()
        .await
        .expect("JSON");
    assert_eq!(daily["spentThisPeriod"], json!(0.02), "{daily}");
    assert_eq!(daily["budget"], json!(0.02), "{daily}");
    assert!(daily["budgetResetsAt"].is_string(), "{daily}");

    // Bob takes the pool's last 0.01; then a queued request fails at once, never waits.
    assert_eq!(w.chat(hello("bob")).await.status(), 200);
    let id: i64 = one(
        &db.client,
        r#"SELECT keypool_submit('carol', 'paid', '{"messages": [{"role": "user", "content": "hi"}]}'::jsonb)"#,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, error) = loop {
        let row = db
            .client
            .query_one("SELECT status, error FROM keypool_result($1)", &[&id])
            .await
            .expect("keypool_result");
        let status: String = row.get(0);
        if status == "done" || status == "failed" {
            break (status, row.get::<_, Option<String>>(1).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "the queued request is still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, "failed");
    assert!(error.contains("BUDGET_EXCEEDED"), "{error}");
    let spent: String = one(
        &db.client,
        "SELECT spent::text FROM keypool_pool_stats WHERE pool = 'paid'",
    )
    .await;
    assert_eq!(spent, "0.030000");
}
