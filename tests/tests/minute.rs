//! Fair in the minute (issue 28), on the real clock and from many connections at once: a burst
//! of one user takes at most its `minute_share`, a newcomer right after is served, and a user's
//! `user_max_concurrent` (and an API token's `max_concurrent`) holds under 32 concurrent callers.
//! (The fair division of a contended minute is in the pg_regress test `minute`, on the test
//! clock.)

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use keypool_tests::{exec, one};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_sixteen_connections_takes_at_most_its_share_of_the_minute() {
    let db = keypool_tests::shared().fresh_db().await;
    let c = &db.client;
    // Seed 000's pool: 15 keys x 15 RPM, minimum share 30; minute_share 0.8: 180 of 225.
    exec(
        c,
        "SELECT keypool_create_pool('seed000', min_share => 30, minute_share => 0.8);
         SELECT keypool_add_key('seed000', 'gemini', 'AIzaSy-burst-' || lpad(i::text, 10, '0'), rpm => 15, rpd => 200)
           FROM generate_series(1, 15) i;",
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            let mut granted = 0i64;
            let mut waits = Vec::new();
            for _ in 0..19 {
                let row = client
                    .query_one(
                        "SELECT granted, error, retry_after_ms FROM keypool_reserve('user-a', 'seed000')",
                        &[],
                    )
                    .await
                    .expect("keypool_reserve");
                if row.get::<_, bool>(0) {
                    granted += 1;
                } else {
                    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("USER_RATE_LIMITED"));
                    waits.push(row.get::<_, Option<i64>>(2).unwrap_or(0));
                }
            }
            (granted, waits)
        }));
    }
    let mut granted = 0;
    let mut waits = Vec::new();
    for t in tasks {
        let (g, w) = t.await.expect("a caller failed");
        granted += g;
        waits.extend(w);
    }
    // 16 x 19 = 304 asked at once: exactly the share, the rest told when their slot opens.
    assert_eq!(granted, 180);
    assert_eq!(waits.len(), 304 - 180);
    assert!(waits.iter().all(|&w| (1..=60_000).contains(&w)), "{waits:?}");
    // A newcomer right after is granted: room was left.
    let b: bool = one(c, "SELECT granted FROM keypool_reserve('user-b', 'seed000')").await;
    assert!(b);
}

/// 32 callers on their own connections, each reserving 20 times with `sql` (`$1`: the caller's
/// number, `$2`: the round; answering granted, reservation_id, error) and settling at once: how
/// many were granted, and the most held open at once (counted after the grant, taken back before
/// the settle: never more than the extension holds open).
async fn most_open(db: &keypool_tests::TestDb<'_>, sql: String) -> (i64, i64) {
    let open = Arc::new((AtomicI64::new(0), AtomicI64::new(0)));
    let mut tasks = Vec::new();
    for caller in 0..32i32 {
        let client = db.connect().await;
        let (open, sql) = (Arc::clone(&open), sql.clone());
        tasks.push(tokio::spawn(async move {
            let mut granted = 0i64;
            for round in 0..20i32 {
                let row = client
                    .query_one(&sql, &[&caller, &round])
                    .await
                    .expect("keypool_reserve");
                if !row.get::<_, bool>(0) {
                    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("USER_RATE_LIMITED"));
                    continue;
                }
                granted += 1;
                let held = open.0.fetch_add(1, Ordering::SeqCst) + 1;
                open.1.fetch_max(held, Ordering::SeqCst);
                client.execute("SELECT pg_sleep(0.002)", &[]).await.expect("sleep");
                open.0.fetch_sub(1, Ordering::SeqCst);
                let id: i64 = row.get(1);
                client
                    .query_one("SELECT keypool_settle($1, 200, 1, 1)", &[&id])
                    .await
                    .expect("settle");
            }
            granted
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.expect("a caller failed");
    }
    (granted, open.1.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_never_holds_more_reservations_open_than_user_max_concurrent() {
    let db = keypool_tests::shared().fresh_db().await;
    let c = &db.client;
    exec(
        c,
        "SELECT keypool_create_pool('agents');
         SELECT keypool_add_key('agents', 'openai', 'sk-agents-key-' || i || '-0000000000', rpm => 100000)
           FROM generate_series(1, 4) i;
         SELECT keypool_alter_pool('agents', user_max_concurrent => 2);",
    )
    .await;
    // One user, whatever the caller and round.
    let (granted, most) = most_open(
        &db,
        "SELECT granted, reservation_id, error
           FROM keypool_reserve(CASE WHEN $1::int >= 0 AND $2::int >= 0 THEN 'one-agent' END, 'agents')"
            .to_string(),
    )
    .await;
    assert!(most <= 2, "{most} open at once");
    assert!(granted > 2, "{granted} granted");
    // Another user is not held back by the first.
    let other: bool = one(c, "SELECT granted FROM keypool_reserve('another-agent', 'agents')").await;
    assert!(other);
    let open_now: i32 = one(
        c,
        "SELECT open_reservations FROM keypool_allocation('one-agent', 'agents')",
    )
    .await;
    assert_eq!(open_now, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_token_never_holds_more_reservations_open_than_its_max_concurrent() {
    let db = keypool_tests::shared().fresh_db().await;
    let c = &db.client;
    exec(
        c,
        "SELECT keypool_create_pool('agents');
         SELECT keypool_create_pool('more');
         SELECT keypool_add_key(p, 'openai', 'sk-token-' || p || '-key-' || i || '-00000', rpm => 100000)
           FROM generate_series(1, 2) i, unnest(ARRAY['agents', 'more']) p;",
    )
    .await;
    let token: String = one(c, "SELECT keypool_create_api_token('agent', max_concurrent => 2)").await;
    // Another user each time, in two pools: one token.
    let (granted, most) = most_open(
        &db,
        format!(
            "SELECT granted, reservation_id, error
               FROM keypool_reserve('user-' || $1::int || '-' || $2::int,
                                    CASE WHEN $1::int % 2 = 0 THEN 'agents' ELSE 'more' END,
                                    10, NULL, sha256(convert_to('{token}', 'UTF8')))"
        ),
    )
    .await;
    assert!(
        most <= 2,
        "{most} open at once for one token, across two pools and 32 users"
    );
    assert!(granted > 2, "{granted} granted");
}
