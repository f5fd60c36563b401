//! Failover to a streaming standby: whatever the standby knew is stale, so the new primary never
//! grants what the old one already granted (no more than rpm in the minute, rpd in the day).

use keypool_tests::{exec, granted_of, one, zone_at_noon, Cluster};

#[tokio::test]
async fn a_promoted_standby_never_grants_what_the_old_primary_granted() {
    // The flusher records every hour only: this test decides when the record is written.
    let settings = ["pg_keypool.flush_interval = '1h'"];
    let primary = Cluster::start("failover-primary", &settings);
    let p = primary.connect("postgres").await;
    let zone = zone_at_noon();
    exec(
        &p,
        &format!(
            "CREATE EXTENSION pg_keypool;
             SELECT keypool_create_pool('a');
             SELECT keypool_add_key('a', 'openai', 'sk-failover-a-000001', account => 'acct-a', rpm => 30, rpd => 40, timezone => '{zone}');
             SELECT keypool_create_pool('b');
             SELECT keypool_add_key('b', 'openai', 'sk-failover-b-000001', account => 'acct-b', rpm => 10, rpd => 100, timezone => '{zone}');"
        ),
    )
    .await;
    // The standby starts from a base backup taken before any grant; its state file says nothing
    // was used.
    exec(&p, "SELECT keypool_save_state()").await;
    let standby = Cluster::standby_of(&primary, "failover-standby", &settings);
    let s = standby.connect("postgres").await;
    assert_eq!(
        one::<String>(&s, "SELECT started_from FROM keypool_status()").await,
        "saved state (recovery: unknown usage assumed; replicated usage applied when recovery ends)"
    );
    // A standby never grants.
    let err = s
        .query_one("SELECT * FROM keypool_reserve('u', 'a')", &[])
        .await
        .expect_err("a standby must not grant");
    assert_eq!(err.code().map(|c| c.code()), Some("25006"));

    // The primary grants 30 of a (its minute) and 10 of b, and records it.
    assert_eq!(granted_of(&p, "a", 30).await, 30);
    assert_eq!(granted_of(&p, "b", 10).await, 10);
    exec(&p, "SELECT keypool_flush()").await;
    // A key added after the record: the standby learns it exists, not what it used.
    exec(
        &p,
        &format!(
            "SELECT keypool_create_pool('c');
             SELECT keypool_add_key('c', 'openai', 'sk-failover-c-000001', account => 'acct-c', rpm => 5, rpd => 20, timezone => '{zone}');"
        ),
    )
    .await;
    assert_eq!(granted_of(&p, "c", 5).await, 5);
    standby.wait_replayed(&p, &s).await;
    drop(s);

    // The machine is lost; the standby is promoted.
    drop(p);
    primary.stop_immediately();
    standby.promote();
    let n = standby.wait_ready("postgres").await;

    // In the same minute nothing more: the old primary may have used every minute window.
    assert_eq!(granted_of(&n, "a", 30).await, 0, "a: granted again in the same minute");
    assert_eq!(granted_of(&n, "b", 10).await, 0, "b: granted again in the same minute");
    assert_eq!(granted_of(&n, "c", 5).await, 0, "c: granted again in the same minute");
    let status = n
        .query_one(
            "SELECT started_from, state_timeline, recovery_ended_at IS NOT NULL FROM keypool_status()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        status.get::<_, Option<i32>>(1),
        Some(1),
        "the state file was the primary's, timeline 1"
    );
    assert!(
        status.get::<_, bool>(2),
        "keypool_status() does not say when recovery ended"
    );

    // Minutes later only the days bind. a: 30 recorded + up to 30 since = its whole day (40).
    // b: 10 recorded + up to 10 since; 80 of its 100 remain, not 90 (one minute's worth is the
    // price of the failover). c: not recorded; up to 5 a minute since it was created.
    let mut granted = [0usize; 3];
    for minute in 1..=12 {
        exec(
            &n,
            &format!("SELECT keypool_set_clock(now() + interval '{} minutes')", minute),
        )
        .await;
        granted[0] += granted_of(&n, "a", 30).await;
        granted[1] += granted_of(&n, "b", 10).await;
        granted[2] += granted_of(&n, "c", 5).await;
    }
    assert_eq!(
        granted[0], 0,
        "a: {} granted; the old primary had used 30 of 40 and may have used the rest",
        granted[0]
    );
    assert!(
        granted[1] <= 90,
        "b: {} granted after 10 before the failover; the day allows 100",
        granted[1]
    );
    assert!(
        granted[1] >= 70,
        "b: {} granted: more pessimistic than one or two minutes' worth",
        granted[1]
    );
    assert!(
        granted[2] <= 15,
        "c: {} granted after 5 before the failover; the day allows 20",
        granted[2]
    );
    assert!(
        granted[2] >= 10,
        "c: {} granted: more pessimistic than one minute's worth",
        granted[2]
    );

    // Recorded usage reached the promoted server's record too.
    exec(&n, "SELECT keypool_flush()").await;
    assert_eq!(
        one::<i64>(&n, "SELECT requests FROM keypool.scope_usage u JOIN keypool.scope s ON s.id = u.scope_id WHERE s.account = 'acct-b'").await,
        100
    );
}

#[tokio::test]
async fn a_state_file_of_another_system_is_not_trusted() {
    let other = Cluster::start("foreign-writer", &[]);
    let o = other.connect("postgres").await;
    exec(
        &o,
        "CREATE EXTENSION pg_keypool;
         SELECT keypool_create_pool('p');
         SELECT keypool_add_key('p', 'openai', 'sk-foreign-key-000001', rpm => 5);",
    )
    .await;
    drop(o);
    other.stop();
    let cluster = Cluster::start("foreign-reader", &[]);
    let c = cluster.connect("postgres").await;
    exec(&c, "CREATE EXTENSION pg_keypool").await;
    drop(c);
    cluster.stop();
    let file = other.data_dir().join("pg_keypool.state");
    let target = cluster.data_dir().join("pg_keypool.state");
    // Over the reader's own file, which keeps its owner (postgres).
    std::fs::write(&target, std::fs::read(&file).expect("read the state file")).expect("write the state file");
    cluster.start_again();
    let c = cluster.connect("postgres").await;
    assert_eq!(
        one::<String>(&c, "SELECT started_from FROM keypool_status()").await,
        "replicated usage (the state file was written by another system and is ignored)"
    );
    assert!(
        cluster.log().contains("was written by another system"),
        "the log does not say why the state file was ignored"
    );
    assert_eq!(one::<i32>(&c, "SELECT scopes_used FROM keypool_status()").await, 0);
}

#[tokio::test]
async fn a_crash_right_after_promotion_still_catches_up() {
    let settings = ["pg_keypool.flush_interval = '1h'", "restart_after_crash = on"];
    let primary = Cluster::start("promote-crash-primary", &settings);
    let p = primary.connect("postgres").await;
    let zone = zone_at_noon();
    exec(
        &p,
        &format!(
            "CREATE EXTENSION pg_keypool;
             SELECT keypool_create_pool('d');
             SELECT keypool_add_key('d', 'openai', 'sk-promote-crash-0001', rpm => 10, rpd => 100, timezone => '{zone}');
             SELECT keypool_save_state();"
        ),
    )
    .await;
    let standby = Cluster::standby_of(&primary, "promote-crash-standby", &settings);
    let s = standby.connect("postgres").await;
    // The primary uses 50 of the day over five minutes (its test clock), and records it.
    for minute in 1..=5 {
        exec(
            &p,
            &format!("SELECT keypool_set_clock(now() + interval '{minute} minutes')"),
        )
        .await;
        assert_eq!(granted_of(&p, "d", 10).await, 10);
    }
    exec(&p, "SELECT keypool_flush()").await;
    standby.wait_replayed(&p, &s).await;
    drop(s);
    drop(p);
    primary.stop_immediately();
    standby.promote();
    // Nobody reserves in the database before a backend crashes: the state file the launcher
    // writes after the promotion says the catch-up is still pending, and the restarted server
    // catches up at first use instead of trusting the standby's old state.
    let witness = standby.wait_ready("postgres").await;
    // A checkpoint on the new timeline: pg_control and the state file agree on the timeline,
    // so only the file's own "catch-up pending" mark can tell.
    exec(&witness, "CHECKPOINT").await;
    let victim = standby.connect("postgres").await;
    let pid: i32 = one(&victim, "SELECT pg_backend_pid()").await;
    let n = standby.crash_backend("postgres", pid, &witness).await;
    let mut granted = 0;
    for minute in 1..=15 {
        exec(
            &n,
            &format!("SELECT keypool_set_clock(now() + interval '{minute} minutes')"),
        )
        .await;
        granted += granted_of(&n, "d", 10).await;
    }
    assert!(
        granted <= 50,
        "{granted} granted after 50 of 100 were used and recorded"
    );
    assert!(
        granted >= 30,
        "{granted} granted: more pessimistic than two minutes' worth"
    );
}
