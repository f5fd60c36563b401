//! Concurrency per key (issue 28): under 32 concurrent callers, each on its own connection, a
//! key never has more reservations open at once than its `max_concurrent`, and every place it
//! frees on settle or release is taken again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use keypool_tests::{exec, one};

const CALLERS: usize = 32;
const ROUNDS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_never_has_more_open_reservations_than_its_max_concurrent() {
    let db = keypool_tests::shared().fresh_db().await;
    let c = &db.client;
    exec(
        c,
        "SELECT keypool_create_pool('boxes');
         SELECT keypool_add_key('boxes', 'ollama', NULL, 'llama3', base_url => 'http://gpu-a:11434', max_concurrent => 1);
         SELECT keypool_add_key('boxes', 'ollama', NULL, 'qwen3', base_url => 'http://gpu-b:11434', max_concurrent => 2);",
    )
    .await;
    let limits: HashMap<i64, i64> = c
        .query(
            "SELECT key_id, max_concurrent::bigint FROM keypool_keys WHERE pool = 'boxes'",
            &[],
        )
        .await
        .expect("keys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // What the callers hold open per key right now, and the most ever seen: counted after the
    // grant and taken back before the settle, so it never exceeds what the extension holds open.
    let open: Arc<HashMap<i64, (AtomicI64, AtomicI64)>> = Arc::new(
        limits
            .keys()
            .map(|&k| (k, (AtomicI64::new(0), AtomicI64::new(0))))
            .collect(),
    );
    let granted = Arc::new(AtomicI64::new(0));
    let refused = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let client = db.connect().await;
        let (open, granted, refused) = (Arc::clone(&open), Arc::clone(&granted), Arc::clone(&refused));
        tasks.push(tokio::spawn(async move {
            let reserve = client
                .prepare("SELECT granted, reservation_id, key_id, error FROM keypool_reserve($1, 'boxes')")
                .await
                .expect("prepare");
            for round in 0..ROUNDS {
                let row = client
                    .query_one(&reserve, &[&format!("caller-{caller}")])
                    .await
                    .expect("keypool_reserve");
                if !row.get::<_, bool>(0) {
                    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("POOL_EXHAUSTED"));
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                granted.fetch_add(1, Ordering::Relaxed);
                let (id, key): (i64, i64) = (row.get(1), row.get(2));
                let (now, most) = &open[&key];
                let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(held, Ordering::SeqCst);
                // Hold it for a moment, as a call to the backend would.
                client.execute("SELECT pg_sleep(0.002)", &[]).await.expect("sleep");
                now.fetch_sub(1, Ordering::SeqCst);
                let end = if round % 2 == 0 {
                    "SELECT keypool_settle($1, 200, 10, 5)::text"
                } else {
                    "SELECT keypool_release($1)::text"
                };
                client.query_one(end, &[&id]).await.expect("settle or release");
            }
        }));
    }
    for t in tasks {
        t.await.expect("a caller failed");
    }
    for (key, limit) in &limits {
        let most = open[key].1.load(Ordering::SeqCst);
        assert!(
            most <= *limit,
            "key {key} had {most} open at once (max_concurrent {limit})"
        );
        assert!(most >= 1, "key {key} never served");
    }
    let (granted, refused) = (granted.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
    assert_eq!(granted + refused, (CALLERS * ROUNDS) as i64);
    assert!(granted > 0 && refused > 0, "{granted} granted, {refused} refused");
    // Everything was settled or released: nothing stays counted.
    let still_open: i64 = one(
        c,
        "SELECT sum(open_reservations)::bigint FROM keypool_keys WHERE pool = 'boxes'",
    )
    .await;
    assert_eq!(still_open, 0);
}
