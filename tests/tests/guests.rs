//! Floods of user ids nobody signed up never hurt members: with the smallest member cache,
//! half a million distinct guests reserving leave room for every signup and every member's
//! reservation; guests that cannot be tracked share one allowance per pool, and are refused
//! with a reason, never an error.

use keypool_tests::{exec, one, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_million_guests_leave_room_for_every_signup_and_member() {
    // The smallest member cache the settings allow: 16,384 entries, 16 per stripe.
    let cluster = Cluster::start("guests", &["pg_keypool.max_members = 16384"]);
    let db = cluster.fresh_db().await;
    let c = &db.client;
    exec(
        c,
        "SELECT keypool_create_pool('flood');
         SELECT keypool_add_key('flood', 'openai', 'sk-flood-key-' || i || '-00000000000', rpd => 1000000)
           FROM generate_series(1, 4) i;
         CREATE TABLE users (id text PRIMARY KEY, grp integer);
         CREATE TRIGGER assign BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('flood', 'id', 'grp');
         INSERT INTO users (id) SELECT 'member-' || i FROM generate_series(1, 1000) i;",
    )
    .await;
    // 500,000 distinct guest ids, one reservation each: every one is answered with a row.
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE (r).granted),
                    count(*) FILTER (WHERE (r).error = 'QUOTA_EXCEEDED'),
                    count(*) FILTER (WHERE NOT (r).granted AND (r).error IS DISTINCT FROM 'QUOTA_EXCEEDED')
               FROM (SELECT keypool_reserve('guest-' || i, 'flood') AS r FROM generate_series(1, 500000) i) s",
            &[],
        )
        .await
        .expect("the flood of guests");
    let (granted, refused, other): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(granted + refused, 500_000);
    assert_eq!(other, 0);
    assert!(refused > 0, "the flood was never refused: {granted} granted");
    let memory = c
        .query_one(
            "SELECT entries, members, guests, free, guest_requests_shared FROM keypool_member_memory",
            &[],
        )
        .await
        .unwrap();
    let (entries, members, guests, free, shared): (i64, i64, i64, i64, i64) = (
        memory.get(0),
        memory.get(1),
        memory.get(2),
        memory.get(3),
        memory.get(4),
    );
    assert_eq!(entries, 16_384);
    // Members are cached on their first reservation; none reserved yet.
    assert_eq!(members, 0);
    // Guests never took the last quarter of any stripe ...
    assert!(free >= entries / 4, "{free} free of {entries} ({guests} guests)");
    // ... and those that could not be tracked shared one allowance: the share of one more
    // member, 4,000,000 / 1,001.
    assert!(shared > 0);
    assert!(
        shared <= 4_000_000 / 1_001,
        "{shared} requests from the shared allowance"
    );
    // A refused guest learns why and when: a row, never an error.
    let refusal = c
        .query_one(
            "SELECT granted, error, retry_after_ms > 0, warning_level FROM keypool_reserve('guest-500001', 'flood')",
            &[],
        )
        .await
        .expect("a refused guest gets a row");
    assert!(!refusal.get::<_, bool>(0));
    assert_eq!(refusal.get::<_, String>(1), "QUOTA_EXCEEDED");
    assert!(refusal.get::<_, bool>(2));
    assert_eq!(refusal.get::<_, String>(3), "exhausted");

    // Every member's first reservation after the flood: all granted, all cached (taking
    // guests' entries where needed).
    assert_eq!(
        one::<i64>(
            c,
            "SELECT count(*) FILTER (WHERE (r).granted)
               FROM (SELECT keypool_reserve('member-' || i, 'flood') r FROM generate_series(1, 1000) i) s"
        )
        .await,
        1_000
    );
    assert_eq!(one::<i64>(c, "SELECT members FROM keypool_member_memory").await, 1_000);
    assert!(one::<i64>(c, "SELECT loads FROM keypool_member_memory").await >= 1_000);

    // Then 100 signups and 100 members' reservations: all succeed.
    exec(
        c,
        "INSERT INTO users (id) SELECT 'after-' || i FROM generate_series(1, 100) i",
    )
    .await;
    assert_eq!(
        one::<i64>(c, "SELECT count(*) FROM users WHERE grp IS NOT NULL").await,
        1_100
    );
    assert_eq!(
        one::<i64>(
            c,
            "SELECT count(*) FILTER (WHERE (r).granted)
               FROM (SELECT keypool_reserve(CASE WHEN i <= 50 THEN 'member-' || i ELSE 'after-' || i END, 'flood') r
                       FROM generate_series(1, 100) i) s"
        )
        .await,
        100
    );
    // More signups than the room guests left in many stripes: members take guests' entries
    // over when they reserve.
    exec(
        c,
        "INSERT INTO users (id) SELECT 'wave-' || i FROM generate_series(1, 2000) i",
    )
    .await;
    assert_eq!(
        one::<i64>(c, "SELECT count(*) FROM users WHERE grp IS NOT NULL").await,
        3_100
    );
    assert!(one::<i64>(c, "SELECT guest_entries_taken_over FROM keypool_member_memory").await > 0);
    assert_eq!(
        one::<i64>(
            c,
            "SELECT count(*) FILTER (WHERE (r).granted)
               FROM (SELECT keypool_reserve('wave-' || i, 'flood') r FROM generate_series(1, 2000) i) s"
        )
        .await,
        2_000
    );
    // Backfilling more members works under the same flood.
    exec(
        c,
        "CREATE TABLE legacy (id text PRIMARY KEY); INSERT INTO legacy SELECT 'legacy-' || i FROM generate_series(1, 300) i;",
    )
    .await;
    assert_eq!(
        one::<i64>(c, "SELECT keypool_backfill('legacy', 'id', 'flood')").await,
        300
    );
    assert_eq!(
        one::<i64>(c, "SELECT count(*) FROM keypool_members WHERE pool = 'flood'").await,
        3_400
    );
    assert_eq!(
        one::<i64>(c, "SELECT members_uncached FROM keypool_member_memory").await,
        0
    );
}

/// How many times this backend has read `keypool.member` by an index, of what it has not
/// reported to the statistics yet (it reports between transactions, never within one).
async fn member_reads(c: &tokio_postgres::Client) -> i64 {
    one::<i64>(
        c,
        "SELECT coalesce(sum(idx_scan), 0)::bigint FROM pg_stat_xact_all_tables
          WHERE schemaname = 'keypool' AND relname = 'member'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_read_from_the_table_once_and_forgotten_when_they_sign_up() {
    let db = keypool_tests::shared().fresh_db().await;
    let c = &db.client;
    // A pool without shares (seed 000's users never sign up through a trigger): guests are
    // served by the keys' limits alone, and nothing of theirs needs counting.
    exec(
        c,
        "SELECT keypool_create_pool('open');
         SELECT keypool_add_key('open', 'openai', 'sk-open-guest-key-' || i || '-0000000', rpm => 100000)
           FROM generate_series(1, 4) i;
         CREATE TABLE users (id text PRIMARY KEY, grp integer);
         CREATE TRIGGER assign BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('open', 'id', 'grp');",
    )
    .await;
    // The pool's first reservation loads its members.
    exec(c, "SELECT keypool_reserve('first', 'open')").await;
    // 200 reservations of 20 guests in one transaction: each guest's row is looked for once,
    // not once per reservation.
    exec(c, "BEGIN").await;
    // Counts not reported yet include earlier transactions': take the difference.
    let before = member_reads(c).await;
    let granted: i64 = one(
        c,
        "SELECT count(*) FILTER (WHERE (keypool_reserve('guest-' || (i % 20), 'open')).granted)
           FROM generate_series(1, 200) i",
    )
    .await;
    assert_eq!(granted, 200);
    let reads = member_reads(c).await - before;
    assert!(reads <= 20, "{reads} reads of keypool.member for 20 guests");
    exec(c, "COMMIT").await;

    // A guest who signs up (in another session, through the app's trigger) is a member at once:
    // their reservations go to their key first.
    let other = db.connect().await;
    exec(&other, "INSERT INTO users (id) VALUES ('guest-7')").await;
    let key: i64 = one(
        c,
        "SELECT key_id FROM keypool_members WHERE pool = 'open' AND user_id = 'guest-7'",
    )
    .await;
    let on_key: i64 = one(
        c,
        &format!(
            "SELECT count(*) FILTER (WHERE (keypool_reserve('guest-7', 'open')).key_id = {key})
               FROM generate_series(1, 12)"
        ),
    )
    .await;
    assert_eq!(on_key, 12, "reservations of the new member on their key {key}");
    // keypool_assign, in this session, alike.
    let key: i64 = one(c, "SELECT keypool_assign('guest-8', 'open')").await;
    let on_key: i64 = one(
        c,
        &format!(
            "SELECT count(*) FILTER (WHERE (keypool_reserve('guest-8', 'open')).key_id = {key})
               FROM generate_series(1, 12)"
        ),
    )
    .await;
    assert_eq!(on_key, 12);
}
