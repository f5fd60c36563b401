//! Restarts and crashes: after either, no scope grants more than its limits allow.

use keypool_tests::{exec, granted_of, one, zone_at_noon, Cluster};
use tokio_postgres::Client;

async fn started_from(client: &Client) -> String {
    client
        .query_one("SELECT started_from FROM keypool_status()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_clean_restart_keeps_what_each_scope_used() {
    let cluster = Cluster::start("clean-restart", &[]);
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        &format!(
            "CREATE EXTENSION pg_keypool;
             SELECT keypool_create_pool('p');
             SELECT keypool_add_key('p', 'openai', 'sk-restart-key-000001', rpm => 100, rpd => 10, timezone => '{}');",
            zone_at_noon()
        ),
    )
    .await;
    assert_eq!(granted_of(&client, "p", 6).await, 6);
    drop(client);
    cluster.restart();
    let client = cluster.connect("postgres").await;
    assert_eq!(started_from(&client).await, "saved state (clean shutdown)");
    assert_eq!(
        granted_of(&client, "p", 10).await,
        4,
        "a restart must not refill the day"
    );
    let used: i64 = client
        .query_one("SELECT requests_today FROM keypool_scopes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(used, 10);
}

#[tokio::test]
async fn after_a_crash_no_scope_grants_more_than_its_limits_allow() {
    // Only the state this test saves itself is on disk.
    let cluster = Cluster::start(
        "crash",
        &["pg_keypool.state_save_interval = '1h'", "restart_after_crash = on"],
    );
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        &format!(
            "CREATE EXTENSION pg_keypool;
             SELECT keypool_create_pool('p');
             SELECT keypool_add_key('p', 'openai', 'sk-crash-key-00000001', rpm => 5, rpd => 50, timezone => '{}');",
            zone_at_noon()
        ),
    )
    .await;
    assert_eq!(granted_of(&client, "p", 3).await, 3);
    exec(&client, "SELECT keypool_save_state()").await;
    // Two more grants that no saved state knows about: 5 used today in truth.
    assert_eq!(granted_of(&client, "p", 2).await, 2);

    let victim = cluster.connect("postgres").await;
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let client = cluster.crash_backend("postgres", pid, &client).await;
    assert_eq!(
        started_from(&client).await,
        "saved state (after a crash; unknown usage assumed)"
    );

    // Right after the crash the minute window is assumed full.
    assert_eq!(granted_of(&client, "p", 5).await, 0);
    // Minutes later only the day limit binds: 45 remain in truth, and no more may be granted.
    exec(&client, "SELECT keypool_set_clock(now() + interval '3 minutes')").await;
    let mut granted = 0;
    for minute in 0..12 {
        exec(
            &client,
            &format!("SELECT keypool_set_clock(now() + interval '{} minutes')", 3 + minute),
        )
        .await;
        granted += granted_of(&client, "p", 6).await;
    }
    assert!(granted <= 45, "{granted} granted after the crash; only 45 were left");
    // The assumption costs at most one minute's worth (5) of the day.
    assert!(
        granted >= 40,
        "{granted} granted after the crash: more pessimistic than documented"
    );
}

#[tokio::test]
async fn without_preloading_the_extension_installs_and_reserving_fails_cleanly() {
    let cluster = Cluster::start("no-preload", &["shared_preload_libraries = ''"]);
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        "CREATE EXTENSION pg_keypool;
         SELECT keypool_create_pool('p');
         SELECT keypool_add_key('p', 'openai', 'sk-no-preload-key-0001');",
    )
    .await;
    let err = client
        .query_one("SELECT * FROM keypool_reserve('u', 'p')", &[])
        .await
        .expect_err("reserve must fail");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "55000");
    assert_eq!(db.message(), "pg_keypool is not loaded in shared_preload_libraries");
    assert!(db.hint().unwrap_or_default().contains("shared_preload_libraries"));
    // The backend is alive and well.
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn members_their_keys_and_their_activity_survive_a_restart() {
    let cluster = Cluster::start("members-restart", &[]);
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        &format!(
            "CREATE EXTENSION pg_keypool;
             SELECT keypool_create_pool('p', active_window => '7 days', timezone => '{}');
             SELECT keypool_add_key('p', 'openai', 'sk-members-key-' || i || '-00000', rpd => 1000) FROM generate_series(1, 3) i;
             SELECT keypool_assign('user-' || i, 'p') FROM generate_series(1, 10) i;
             SELECT keypool_set_user_weight('user-1', 'p', 3);",
            zone_at_noon()
        ),
    )
    .await;
    // Four members are active today: they, and only they, share the capacity.
    for u in ["user-1", "user-2", "user-3", "user-4"] {
        let row = client
            .query_one("SELECT granted FROM keypool_reserve($1, 'p')", &[&u])
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0));
    }
    exec(&client, "SELECT keypool_flush()").await;
    let before = pool_state(&client).await;
    assert_eq!(before.1, 4, "counted users before the restart");
    // user-1 (weight 3) came first: its share was fixed at the whole capacity, and it used one.
    assert_eq!(before.3, (Some(3000), 1));
    drop(client);
    cluster.restart();
    let client = cluster.connect("postgres").await;
    assert_eq!(
        pool_state(&client).await,
        before,
        "users per key, counted users and shares after the restart"
    );
    // A clean restart restores the pool's aggregates from the state file; a run without the
    // library in between (when a table can change behind shared memory's back) makes the next
    // start count the members from the table again.
    drop(client);
    let mut cluster = cluster;
    cluster.stop();
    cluster.reconfigure(&["shared_preload_libraries = ''"]);
    cluster.start_again();
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        "INSERT INTO keypool.member (pool_id, user_id, user_hash, key_id)
         SELECT pool_id, 'user-11', 11, key_id FROM keypool.member WHERE user_id = 'user-2'",
    )
    .await;
    drop(client);
    cluster.stop();
    cluster.reconfigure(&[]);
    cluster.start_again();
    let client = cluster.connect("postgres").await;
    assert_eq!(
        one::<i64>(&client, "SELECT sum(users)::bigint FROM keypool_keys").await,
        11
    );
    assert_eq!(one::<i64>(&client, "SELECT members FROM keypool_pool_stats").await, 11);
    // An immediate stop in the middle of an assignment: the assignment never committed, and
    // the next start does not take the aggregates it changed for the truth.
    client
        .batch_execute("BEGIN; SELECT keypool_assign('user-12', 'p');")
        .await
        .unwrap();
    assert_eq!(
        one::<i64>(&client, "SELECT sum(users)::bigint FROM keypool_keys").await,
        12
    );
    cluster.stop_immediately();
    drop(client);
    cluster.start_again();
    let client = cluster.connect("postgres").await;
    assert_eq!(
        one::<i64>(&client, "SELECT sum(users)::bigint FROM keypool_keys").await,
        11
    );
    assert_eq!(one::<i64>(&client, "SELECT members FROM keypool_pool_stats").await, 11);
}

/// (users per key, counted users, share of a new weight-1 user, share and use today of user-1).
async fn pool_state(client: &Client) -> (Vec<i64>, i64, Option<i64>, (Option<i64>, i64)) {
    let users: Vec<i64> = client
        .query("SELECT users FROM keypool_keys ORDER BY key_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let row = client
        .query_one("SELECT counted_users, share_per_user FROM keypool_pool_stats", &[])
        .await
        .unwrap();
    let user_1 = client
        .query_one(
            "SELECT allocated_today, used_today FROM keypool_allocation('user-1', 'p')",
            &[],
        )
        .await
        .unwrap();
    (users, row.get(0), row.get(1), (user_1.get(0), user_1.get(1)))
}

#[tokio::test]
async fn after_a_crash_members_keep_what_they_used_of_their_share() {
    let cluster = Cluster::start("members-crash", &["restart_after_crash = on"]);
    let client = cluster.connect("postgres").await;
    exec(
        &client,
        &format!(
            "CREATE EXTENSION pg_keypool;
             SELECT keypool_create_pool('p', timezone => '{}');
             SELECT keypool_add_key('p', 'openai', 'sk-share-crash-00001', rpd => 100);
             SELECT keypool_assign('user-' || i, 'p') FROM generate_series(1, 4) i;",
            zone_at_noon()
        ),
    )
    .await;
    let stmt = client
        .prepare("SELECT granted FROM keypool_reserve($1, 'p')")
        .await
        .unwrap();
    for _ in 0..7 {
        assert!(client.query_one(&stmt, &[&"user-1"]).await.unwrap().get::<_, bool>(0));
    }
    assert!(client.query_one(&stmt, &[&"user-2"]).await.unwrap().get::<_, bool>(0));
    // The flusher writes members' use with the history; this test writes it now.
    exec(&client, "SELECT keypool_flush()").await;
    let victim = cluster.connect("postgres").await;
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let client = cluster.crash_backend("postgres", pid, &client).await;
    assert_eq!(
        started_from(&client).await,
        "saved state (after a crash; unknown usage assumed)"
    );
    for (user, want) in [("user-1", 7i64), ("user-2", 1), ("user-3", 0)] {
        let got: i64 = client
            .query_one("SELECT used_today FROM keypool_allocation($1, 'p')", &[&user])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{user}'s use of their share after the crash");
    }
    // Both still count as active today: user-3's share is the rest split among three.
    let counted: i64 = client
        .query_one("SELECT counted_users FROM keypool_pool_stats", &[])
        .await
        .unwrap()
        .get(0);
    assert!(counted >= 2, "{counted} users counted after the crash");
}
