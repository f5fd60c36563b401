//! Shared memory is a cache of members (issue 16): with the smallest cache the settings allow
//! (16,384 entries) and 40,000 members, members are evicted and read back from keypool.member,
//! and none loses what they used of their share today; under pressure (more members with
//! unflushed use than entries) members are still served within their share.

use keypool_tests::{exec, one, zone_at_noon, Cluster};

/// Granted and refused (QUOTA_EXCEEDED) reservations of `users` (an SQL expression over i),
/// each reserving `times` times, for i in `from..=to`.
async fn reserve_all(c: &tokio_postgres::Client, from: i32, to: i32, times: i32) -> (i64, i64) {
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE (r).granted),
                    count(*) FILTER (WHERE (r).error = 'QUOTA_EXCEEDED'),
                    count(*) FILTER (WHERE NOT (r).granted AND (r).error IS DISTINCT FROM 'QUOTA_EXCEEDED')
               FROM (SELECT keypool_reserve('u-' || i, 'c') AS r
                       FROM generate_series($1::int, $2::int) i, generate_series(1, $3::int) t) s",
            &[&from, &to, &times],
        )
        .await
        .expect("reservations");
    assert_eq!(row.get::<_, i64>(2), 0, "refusals other than QUOTA_EXCEEDED");
    (row.get(0), row.get(1))
}

async fn memory(c: &tokio_postgres::Client, column: &str) -> i64 {
    one::<i64>(c, &format!("SELECT {column} FROM keypool_member_memory")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_members_keep_what_they_used_of_their_share() {
    // Flushes are made by the test (and by pressure), not by the interval.
    let cluster = Cluster::start(
        "cache",
        &["pg_keypool.max_members = 16384", "pg_keypool.flush_interval = '1h'"],
    );
    let db = cluster.fresh_db().await;
    let c = &db.client;
    // 4 keys of 50,000 requests a day over 40,000 members: a share of 5 each.
    exec(
        c,
        &format!(
            "SELECT keypool_create_pool('c', timezone => '{}');
             SELECT keypool_add_key('c', 'openai', 'sk-cache-key-' || i || '-000000000000', rpd => 50000)
               FROM generate_series(1, 4) i;
             CREATE TABLE users (id text PRIMARY KEY);
             INSERT INTO users SELECT 'u-' || i FROM generate_series(1, 40000) i;",
            zone_at_noon()
        ),
    )
    .await;
    assert_eq!(
        one::<i64>(c, "SELECT keypool_backfill('users', 'id', 'c')").await,
        40_000
    );
    let spread: i64 = one(
        c,
        "SELECT max(n) - min(n) FROM (SELECT count(*) n FROM keypool_members GROUP BY key_id) s",
    )
    .await;
    assert!(spread <= 1, "members per key differ by {spread}");
    assert_eq!(
        one::<i64>(c, "SELECT allocated_today FROM keypool_allocation('u-1', 'c')").await,
        5
    );
    assert_eq!(memory(c, "members").await, 0, "no member reserved yet");

    // 2,000 members use 3 of their 5.
    assert_eq!(reserve_all(c, 1, 2_000, 3).await, (6_000, 0));
    exec(c, "SELECT keypool_flush()").await;

    // 38,000 other members reserve once, flushed every 6,000: the cache of 16,384 entries
    // evicts clean entries to make room, the first 2,000 among them.
    let evictions_before = memory(c, "evictions").await;
    // Requests served without an entry from here on, by the members u-20001 .. u-40000 (the
    // chunks below start there), which the last check adds up.
    let mut uncached_before = 0;
    let mut from = 2_001;
    while from <= 40_000 {
        if from == 20_001 {
            uncached_before = memory(c, "members_uncached").await;
        }
        let to = (from + 5_999).min(40_000);
        assert_eq!(reserve_all(c, from, to, 1).await, ((to - from + 1) as i64, 0));
        exec(c, "SELECT keypool_flush()").await;
        from = to + 1;
    }
    assert!(memory(c, "evictions").await - evictions_before >= 20_000);
    assert!(memory(c, "members").await <= 16_384);

    // The first 2,000 again, three times each: exactly the 2 left of their share each,
    // whether they were still cached or read back from the table.
    let loads_before = memory(c, "loads").await;
    assert_eq!(reserve_all(c, 1, 2_000, 3).await, (4_000, 2_000));
    let reloaded = memory(c, "loads").await - loads_before;
    assert!(reloaded >= 1_000, "only {reloaded} of 2,000 members were read back");
    eprintln!("{reloaded} of 2,000 members were read back from the table");
    assert_eq!(
        one::<i64>(c, "SELECT used_today FROM keypool_allocation('u-1', 'c')").await,
        5
    );
    // What an uncached member's view shows comes from the table too.
    exec(c, "SELECT keypool_flush()").await;
    assert_eq!(
        one::<i64>(
            c,
            "SELECT count(*) FROM generate_series(1, 2000) i, keypool_allocation('u-' || i, 'c') a
              WHERE a.used_today = 5 AND a.remaining_today = 0"
        )
        .await,
        2_000
    );

    // Pressure: 20,000 members with use not yet flushed, more than the cache holds. Every one
    // is served within their share (1 of 5 used): none is refused for the cache's sake. A
    // member served without an entry is counted in members_uncached; every other request (of
    // these 20,000 and of their earlier 20,000) is in the member's own use.
    assert_eq!(reserve_all(c, 20_001, 40_000, 1).await, (20_000, 0));
    let uncached = memory(c, "members_uncached").await - uncached_before;
    eprintln!("{uncached} requests of u-20001 .. u-40000 served without an entry");
    exec(c, "SELECT keypool_flush()").await;
    assert_eq!(
        one::<i64>(
            c,
            "SELECT sum(a.used_today)::bigint FROM generate_series(20001, 40000) i, keypool_allocation('u-' || i, 'c') a"
        )
        .await,
        40_000 - uncached
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_signups_rollbacks_and_reservations_keep_the_counts_of_the_table() {
    // The smallest cache, so that members are evicted and read back while assignments race.
    let cluster = Cluster::start("cache-race", &["pg_keypool.max_members = 16384"]);
    let db = cluster.fresh_db().await;
    exec(
        &db.client,
        &format!(
            "SELECT keypool_create_pool('r', timezone => '{}');
             SELECT keypool_add_key('r', 'openai', 'sk-race-key-' || i || '-000000000000', rpd => 1000000)
               FROM generate_series(1, 7) i;",
            zone_at_noon()
        ),
    )
    .await;
    // Eight sessions sign up the same 3,000 ids in the same order, racing for each (each id is
    // assigned once, whoever comes first: the others take their choice back), roll back every
    // fifth signup of a fresh id of their own, and reserve for ids that may or may not be
    // members yet.
    let mut tasks = Vec::new();
    for s in 0..8i32 {
        let client = db.connect().await;
        tasks.push(tokio::spawn(async move {
            for n in 0..3_000i32 {
                let i = n;
                client
                    .execute("SELECT keypool_assign('m-' || $1::int, 'r')", &[&i])
                    .await
                    .unwrap();
                if n % 5 == 0 {
                    client
                        .batch_execute(&format!("BEGIN; SELECT keypool_assign('gone-{s}-{n}', 'r'); ROLLBACK;"))
                        .await
                        .unwrap();
                }
                let other = (i + 1_500) % 3_000;
                client
                    .execute("SELECT keypool_reserve('m-' || $1::int, 'r')", &[&other])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = &db.client;
    assert_eq!(one::<i64>(c, "SELECT count(*) FROM keypool_members").await, 3_000);
    // Shared memory's count per key is the table's, key by key.
    let per_key: Vec<(i64, i64, i64)> = c
        .query(
            "SELECT k.key_id, k.users, coalesce(m.n, 0) FROM keypool_keys k
               LEFT JOIN (SELECT key_id, count(*) n FROM keypool_members GROUP BY key_id) m USING (key_id)
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        per_key.iter().all(|(_, shmem, table)| shmem == table),
        "(key, shared memory, table): {per_key:?}"
    );
    assert!(
        one::<i64>(c, "SELECT max(users) - min(users) FROM keypool_keys").await <= 1,
        "members per key differ by more than one"
    );
    // The pool's aggregates count every member once.
    assert_eq!(
        one::<i64>(c, "SELECT members FROM keypool_pool_stats WHERE pool = 'r'").await,
        3_000
    );
}
