//! Users of pools from real client sessions: signups through the trigger under concurrency,
//! backfill of an existing table, rebalancing, spill-over, and one user's share under
//! concurrency.

use std::collections::HashMap;
use std::time::Instant;

use keypool_tests::{exec, shared, TestDb};
use tokio_postgres::Client;

/// 31 xAI keys (seed 004) in pool `pool`.
async fn xai_pool(db: &TestDb<'_>, pool: &str, keys: i32) {
    exec(
        &db.client,
        &format!(
            "SELECT keypool_create_pool('{pool}');
             SELECT keypool_add_key('{pool}', 'xai', 'xai-{pool}-key-' || lpad(i::text, 2, '0') || '-0000000000', 'grok-4',
                                    rpm => 480, tpm => 2000000)
               FROM generate_series(1, {keys}) i;"
        ),
    )
    .await;
}

async fn users_per_key(client: &Client, pool: &str) -> Vec<i64> {
    client
        .query(
            "SELECT users FROM keypool_keys WHERE pool = $1 ORDER BY key_id",
            &[&pool],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_signups_spread_within_one_user_per_key() {
    let db = shared().fresh_db().await;
    xai_pool(&db, "grok", 31).await;
    exec(
        &db.client,
        "CREATE TABLE user_profiles (id bigint PRIMARY KEY, email text, api_key_group int);
         CREATE TRIGGER assign_key BEFORE INSERT ON user_profiles
             FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('grok', 'id', 'api_key_group');",
    )
    .await;
    let mut tasks = Vec::new();
    for s in 0..16i64 {
        let client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("INSERT INTO user_profiles (id, email) VALUES ($1, $2)")
                .await
                .unwrap();
            // 16 sessions x 63 attempts, the first 1000 of them.
            for i in 0..63i64 {
                let id = s * 1000 + i;
                if s * 63 + i >= 1000 {
                    break;
                }
                client
                    .execute(&stmt, &[&id, &format!("user{id}@example.com")])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = users_per_key(&db.client, "grok").await;
    assert_eq!(counts.iter().sum::<i64>(), 1000);
    assert!(counts.iter().all(|&c| c == 32 || c == 33), "{counts:?}");
    // The group written into each row is the key it was assigned, and the table agrees.
    let mismatched: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM user_profiles u JOIN keypool_members m ON m.pool = 'grok' AND m.user_id = u.id::text
              WHERE u.api_key_group IS DISTINCT FROM m.group_no",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);
    let per_group: Vec<i64> = db
        .client
        .query(
            "SELECT count(*) FROM user_profiles GROUP BY api_key_group ORDER BY api_key_group",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(per_group.len(), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfilling_a_hundred_thousand_users_is_balanced_and_idempotent() {
    let db = shared().fresh_db().await;
    xai_pool(&db, "grok", 31).await;
    exec(
        &db.client,
        "CREATE TABLE user_profiles (id uuid PRIMARY KEY, api_key_group int);
         INSERT INTO user_profiles (id) SELECT md5(i::text)::uuid FROM generate_series(1, 100000) i;",
    )
    .await;
    let started = Instant::now();
    let added: i64 = db
        .client
        .query_one(
            "SELECT keypool_backfill('user_profiles', 'id', 'grok', 'api_key_group')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let took = started.elapsed();
    println!("backfill of 100,000 users: {took:?}");
    assert_eq!(added, 100_000);
    let counts = users_per_key(&db.client, "grok").await;
    assert_eq!(counts.iter().sum::<i64>(), 100_000);
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{counts:?}"
    );
    let ungrouped: i64 = db
        .client
        .query_one("SELECT count(*) FROM user_profiles WHERE api_key_group IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ungrouped, 0);
    let again: i64 = db
        .client
        .query_one(
            "SELECT keypool_backfill('user_profiles', 'id', 'grok', 'api_key_group')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, 0);
    assert_eq!(users_per_key(&db.client, "grok").await, counts);
}

#[tokio::test]
async fn rebalancing_after_two_new_keys_moves_the_fewest_users() {
    let db = shared().fresh_db().await;
    xai_pool(&db, "grok", 31).await;
    exec(
        &db.client,
        "SELECT keypool_assign('user-' || i, 'grok') FROM generate_series(1, 1023) i",
    )
    .await;
    assert!(users_per_key(&db.client, "grok").await.iter().all(|&c| c == 33));
    exec(
        &db.client,
        "SELECT keypool_add_key('grok', 'xai', 'xai-grok-new-key-' || i || '-000000', 'grok-4') FROM generate_series(1, 2) i",
    )
    .await;
    let moved: i64 = db
        .client
        .query_one("SELECT keypool_rebalance('grok')", &[])
        .await
        .unwrap()
        .get(0);
    // 1023 users over 33 keys is 31 each: 2 x 31 = 62 users move, no more.
    assert_eq!(moved, 62);
    let counts = users_per_key(&db.client, "grok").await;
    assert!(counts.iter().all(|&c| c == 31), "{counts:?}");
    let table: Vec<i64> = db
        .client
        .query(
            "SELECT count(*) FROM keypool_members WHERE pool = 'grok' GROUP BY key_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(table.len(), 33);
    assert!(
        table.iter().all(|&c| c == 31),
        "the table disagrees with shared memory: {table:?}"
    );
    // New signups now go where there is room, and a second rebalance has nothing to do.
    let again: i64 = db
        .client
        .query_one("SELECT keypool_rebalance('grok')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_spill_over_when_the_assigned_key_is_full_or_disabled() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_set_clock('2031-01-01 10:00:00+00');
         SELECT keypool_create_pool('spill');
         SELECT keypool_add_key('spill', 'openai', 'sk-spill-key-' || i || '-00000000', account => 'org-' || i, rpm => 5)
           FROM generate_series(1, 4) i;
         SELECT keypool_assign('user-' || i, 'spill') FROM generate_series(1, 8) i;",
    )
    .await;
    let assigned: HashMap<String, i64> = db
        .client
        .query("SELECT user_id, key_id FROM keypool_members WHERE pool = 'spill'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Each key takes 5 a minute and has 2 users: 8 users x 2 requests stay on their own keys.
    let reserve = "SELECT granted, key_id FROM keypool_reserve($1, 'spill')";
    for (user, key) in &assigned {
        for _ in 0..2 {
            let row = db.client.query_one(reserve, &[user]).await.unwrap();
            assert!(row.get::<_, bool>(0));
            assert_eq!(row.get::<_, i64>(1), *key, "{user} left its key while it had room");
        }
    }
    // user-1's key has 1 request left; its next 3 requests go on, on other keys.
    let user = "user-1".to_string();
    let own = assigned[&user];
    let mut elsewhere = 0;
    for _ in 0..3 {
        let row = db.client.query_one(reserve, &[&user]).await.unwrap();
        assert!(row.get::<_, bool>(0));
        elsewhere += (row.get::<_, i64>(1) != own) as i32;
    }
    assert_eq!(elsewhere, 2);
    // A minute later, disabled: every request of its users goes elsewhere, from every session.
    let other = assigned.iter().find(|(_, &k)| k != own).map(|(_, &k)| k).unwrap();
    exec(
        &db.client,
        &format!("SELECT keypool_set_clock('2031-01-01 10:01:00+00'); SELECT keypool_disable_key({other})"),
    )
    .await;
    let users: Vec<String> = assigned
        .iter()
        .filter(|(_, &k)| k == other)
        .map(|(u, _)| u.clone())
        .collect();
    let session = db.connect().await;
    for u in &users {
        let row = session.query_one(reserve, &[u]).await.unwrap();
        assert!(row.get::<_, bool>(0));
        assert_ne!(row.get::<_, i64>(1), other);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_in_thirty_two_sessions_gets_exactly_their_share() {
    let db = shared().fresh_db().await;
    exec(
        &db.client,
        "SELECT keypool_create_pool('fair', min_share => 30);
         SELECT keypool_add_key('fair', 'gemini', 'AIzaSy-fair-key-' || lpad(i::text, 2, '0') || '-000000', 'gemini-2.5-flash',
                                rpd => 200, rpm => 1000)
           FROM generate_series(1, 15) i;
         SELECT keypool_assign('user-' || i, 'fair') FROM generate_series(1, 100) i;",
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("SELECT granted, error FROM keypool_reserve('user-7', 'fair')")
                .await
                .unwrap();
            let (mut granted, mut exceeded) = (0, 0);
            for _ in 0..10 {
                let row = client.query_one(&stmt, &[]).await.unwrap();
                if row.get::<_, bool>(0) {
                    granted += 1;
                } else if row.get::<_, Option<String>>(1).as_deref() == Some("QUOTA_EXCEEDED") {
                    exceeded += 1;
                }
            }
            (granted, exceeded)
        }));
    }
    let (mut granted, mut exceeded) = (0, 0);
    for t in tasks {
        let (g, e) = t.await.unwrap();
        granted += g;
        exceeded += e;
    }
    // 3,000 a day over 100 users: a share of 30, exactly.
    assert_eq!(granted, 30);
    assert_eq!(exceeded, 320 - 30);
    let row = db
        .client
        .query_one(
            "SELECT used_today, remaining_today FROM keypool_allocation('user-7', 'fair')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 30);
    assert_eq!(row.get::<_, Option<i64>>(1), Some(0));
}

#[tokio::test]
async fn a_prepared_assignment_counts_only_once_it_is_committed() {
    let cluster = keypool_tests::Cluster::start("two-phase", &["max_prepared_transactions = 4"]);
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        "CREATE EXTENSION pg_keypool;
         SELECT keypool_create_pool('p');
         SELECT keypool_add_key('p', 'openai', 'sk-two-phase-' || i || '-000000') FROM generate_series(1, 2) i;",
    )
    .await;
    // Three signups prepared, then rolled back from another session: nobody was assigned.
    exec(
        &client,
        "BEGIN;
         SELECT keypool_assign('rolled-' || i, 'p') FROM generate_series(1, 3) i;
         PREPARE TRANSACTION 'signups-1';",
    )
    .await;
    let other = cluster.connect("postgres").await;
    exec(&other, "ROLLBACK PREPARED 'signups-1'").await;
    assert_eq!(users_per_key(&client, "p").await, vec![0, 0]);
    // New signups are spread as if the rolled-back ones never were.
    exec(
        &client,
        "SELECT keypool_assign('new-' || i, 'p') FROM generate_series(1, 4) i",
    )
    .await;
    assert_eq!(users_per_key(&client, "p").await, vec![2, 2]);

    // Prepared and committed: they count once the commit is done, exactly once.
    exec(
        &client,
        "BEGIN;
         SELECT keypool_assign('kept-' || i, 'p') FROM generate_series(1, 3) i;
         PREPARE TRANSACTION 'signups-2';",
    )
    .await;
    exec(&other, "COMMIT PREPARED 'signups-2'").await;
    let per_key = users_per_key(&client, "p").await;
    assert_eq!(per_key.iter().sum::<i64>(), 7, "{per_key:?}");
    let members: i64 = client
        .query_one("SELECT count(*) FROM keypool.member", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(members, 7);
    let kept: i64 = client
        .query_one("SELECT keypool_assign('kept-1', 'p')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(kept > 0);
    assert_eq!(
        users_per_key(&client, "p").await.iter().sum::<i64>(),
        7,
        "kept-1 was assigned twice"
    );
}
