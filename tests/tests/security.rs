//! Trust boundaries, tried the way an attacker with an ordinary role would: look-alike functions
//! and operators planted in schemas the caller controls never run with the extension owner's
//! rights (neither in any entry point nor in the background); a role with `use` on one pool
//! reaches nothing else; secrets are ciphertext in dumps and in every file of the data directory.

use std::path::Path;
use std::time::{Duration, Instant};

use keypool_tests::{exec, one, shared};

/// Functions the extension's SQL uses (or might), planted with the same names and argument
/// types: (name, argument types). Each records who ran it, then does what the real one does.
const PLANTED_FUNCTIONS: &[(&str, &[&str])] = &[
    ("left", &["text", "integer"]),
    ("right", &["text", "integer"]),
    ("lower", &["text"]),
    ("upper", &["text"]),
    ("length", &["text"]),
    ("btrim", &["text"]),
    ("replace", &["text", "text", "text"]),
    ("substr", &["text", "integer", "integer"]),
    ("strpos", &["text", "text"]),
    ("format", &["text", "text"]),
    ("format", &["text", "text", "text"]),
    ("concat_ws", &["text", "text", "text"]),
    ("encode", &["bytea", "text"]),
    ("now", &[]),
    ("clock_timestamp", &[]),
    ("date_trunc", &["text", "timestamp with time zone"]),
    ("to_char", &["timestamp with time zone", "text"]),
    ("round", &["numeric", "integer"]),
    ("floor", &["double precision"]),
    ("abs", &["bigint"]),
    ("pg_notify", &["text", "text"]),
    ("hashtext", &["text"]),
    ("pg_advisory_xact_lock", &["bigint"]),
    ("current_setting", &["text", "boolean"]),
    ("nextval", &["regclass"]),
    ("pg_get_serial_sequence", &["text", "text"]),
    ("jsonb_typeof", &["jsonb"]),
    ("random", &[]),
];

/// Operators, with their operand types.
const PLANTED_OPERATORS: &[(&str, &str, &str)] = &[
    ("=", "bigint", "bigint"),
    ("=", "integer", "integer"),
    ("=", "text", "text"),
    ("=", "name", "text"),
    ("=", "bytea", "bytea"),
    ("=", "oid", "oid"),
    ("=", "bigint", "integer"),
    ("=", "timestamp with time zone", "timestamp with time zone"),
    ("=", "date", "date"),
    ("<>", "bigint", "bigint"),
    ("<>", "text", "text"),
    ("<>", "bytea", "bytea"),
    ("<", "bigint", "bigint"),
    ("<", "timestamp with time zone", "timestamp with time zone"),
    ("<", "integer", "integer"),
    (">", "bigint", "bigint"),
    (">", "timestamp with time zone", "timestamp with time zone"),
    (">=", "integer", "integer"),
    ("<=", "integer", "integer"),
    ("+", "bigint", "bigint"),
    ("+", "integer", "integer"),
    ("+", "timestamp with time zone", "interval"),
    ("+", "date", "integer"),
    ("-", "bigint", "bigint"),
    ("-", "timestamp with time zone", "interval"),
    ("-", "timestamp with time zone", "timestamp with time zone"),
    ("-", "date", "integer"),
    ("*", "bigint", "bigint"),
    ("/", "bigint", "bigint"),
    ("||", "text", "text"),
    ("->", "jsonb", "text"),
    ("->>", "jsonb", "text"),
    ("~~", "text", "text"),
];

/// SQL (run as the attacker) that plants every look-alike in schema `schema`, recording each
/// call in `s.hits` with the role that made it.
fn planting(schema: &str) -> String {
    let functions = PLANTED_FUNCTIONS
        .iter()
        .map(|(name, args)| {
            format!(
                "('{name}', ARRAY[{}]::text[])",
                args.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join(",\n");
    let operators = PLANTED_OPERATORS
        .iter()
        .map(|(op, l, r)| format!("('{op}', '{l}', '{r}')"))
        .collect::<Vec<_>>()
        .join(",\n");
    format!(
        r#"
DO $plant$
DECLARE
    f record;
    o record;
    rt regtype;
    n int := 0;
    params text;
    call text;
BEGIN
    FOR f IN SELECT * FROM (VALUES {functions}) v(name, args) LOOP
        n := n + 1;
        SELECT coalesce(string_agg(format('a%s %s', i, t), ', ' ORDER BY i), ''),
               coalesce(string_agg(format('a%s', i), ', ' ORDER BY i), '')
          INTO params, call
          FROM unnest(f.args) WITH ORDINALITY AS a(t, i);
        SELECT p.prorettype::regtype INTO rt FROM pg_proc p
         WHERE p.oid = to_regprocedure(format('pg_catalog.%I(%s)', f.name, array_to_string(f.args, ',')));
        IF rt IS NULL THEN
            EXECUTE format('SELECT pg_typeof(pg_catalog.%I(%s))', f.name,
                           (SELECT coalesce(string_agg(format('NULL::%s', t), ', '), '') FROM unnest(f.args) t)) INTO rt;
        END IF;
        EXECUTE format($f$CREATE FUNCTION {schema}.%I(%s) RETURNS %s LANGUAGE plpgsql AS $body$
                         BEGIN INSERT INTO s.hits VALUES (current_user, %L); %s pg_catalog.%I(%s); %s END $body$$f$,
                       f.name, params, rt, '{schema}.' || f.name,
                       CASE WHEN rt = 'void'::regtype THEN 'PERFORM' ELSE 'RETURN' END, f.name, call,
                       CASE WHEN rt = 'void'::regtype THEN 'RETURN;' ELSE '' END);
    END LOOP;
    FOR o IN SELECT * FROM (VALUES {operators}) v(op, l, r) LOOP
        n := n + 1;
        EXECUTE format('SELECT pg_typeof(NULL::%s OPERATOR(pg_catalog.%s) NULL::%s)', o.l, o.op, o.r) INTO rt;
        EXECUTE format($f$CREATE FUNCTION {schema}.op_%s(a %s, b %s) RETURNS %s LANGUAGE plpgsql AS $body$
                         BEGIN INSERT INTO s.hits VALUES (current_user, %L); RETURN a OPERATOR(pg_catalog.%s) b; END $body$$f$,
                       n, o.l, o.r, rt, '{schema}.' || o.op || ' ' || o.l || ', ' || o.r, o.op);
        EXECUTE format('CREATE OPERATOR {schema}.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = {schema}.op_%s)',
                       o.op, o.l, o.r, n);
    END LOOP;
END
$plant$;
CREATE FUNCTION {schema}.count_star(state bigint) RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s.hits VALUES (current_user, '{schema}.count(*)'); RETURN state + 1; END $$;
CREATE AGGREGATE {schema}.count(*) (SFUNC = {schema}.count_star, STYPE = bigint, INITCOND = '0');
CREATE FUNCTION {schema}.sum_step(state numeric, v bigint) RETURNS numeric LANGUAGE plpgsql AS $$
BEGIN INSERT INTO s.hits VALUES (current_user, '{schema}.sum(bigint)'); RETURN coalesce(state, 0) + coalesce(v, 0); END $$;
CREATE AGGREGATE {schema}.sum(bigint) (SFUNC = {schema}.sum_step, STYPE = numeric);
"#
    )
}

/// Every entry point the book (Privileges) lets an application, an operator, a worker or a pool administrator
/// be granted, called once (or more) by the attacker with its own search path in force.
const ENTRY_POINTS: &[&str] = &[
    "SELECT keypool_create_pool('attack2', min_share => 1)",
    "SELECT keypool_alter_pool('attack', min_share => 2, borrowing => true)",
    "SELECT keypool_add_key('attack', 'openai', 'sk-planted-attack-key-000003', rpm => 1000, rpd => 100000)",
    "SELECT keypool_settle((keypool_reserve('u1', 'attack', 10)).reservation_id, 200, 5, 5)",
    "SELECT keypool_settle((keypool_reserve('u2', 'attack')).reservation_id, 429, retry_after_ms => 500, error_code => 'rate_limit_exceeded')",
    "SELECT keypool_reset_usage('attack')",
    "SELECT keypool_settle((keypool_reserve('u3', 'attack')).reservation_id, 500)",
    "SELECT keypool_release((keypool_reserve('u4', 'attack')).reservation_id)",
    "SELECT * FROM keypool_allocation('u1', 'attack')",
    "SELECT keypool_can_request('u1', 'attack')",
    "SELECT keypool_assign('member-1', 'attack')",
    "SELECT keypool_set_user_weight('member-1', 'attack', 5)",
    "INSERT INTO s.users (id) SELECT 'signup-' || i FROM generate_series(1, 20) i",
    "SELECT keypool_backfill('s.legacy'::regclass, 'id', 'attack', 'grp')",
    "SELECT keypool_rebalance('attack')",
    "SELECT keypool_submit('u1', 'attack', '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}')",
    "SELECT * FROM keypool_result((SELECT max(id) FROM keypool_requests))",
    "SELECT * FROM keypool_claim_requests('attacker-worker', 5, '1 minute')",
    "SELECT keypool_complete_request((SELECT max(id) FROM keypool_requests), 'attacker-worker', 'done', '{\"ok\": 1}')",
    "SELECT keypool_queue_wake_at()",
    "SELECT keypool_worker_heartbeat('attacker-worker', '0.2.0', 'host', 1, now(), 1, 0, 1)",
    "SELECT keypool_worker_stopped('attacker-worker')",
    "SELECT * FROM keypool_models()",
    "SELECT * FROM keypool_key_credentials((SELECT min(key_id) FROM keypool_keys WHERE pool = 'attack'))",
    "SELECT keypool_set_price('openai', NULL, 0.15, 0.60)",
    "SELECT * FROM keypool_usage_report(current_date - 1, current_date + 1)",
    "SELECT keypool_disable_key((SELECT min(key_id) FROM keypool_keys WHERE pool = 'attack'), 'maintenance')",
    "SELECT keypool_enable_key((SELECT min(key_id) FROM keypool_keys WHERE pool = 'attack'))",
    "SELECT keypool_settle((keypool_reserve('u5', 'attack')).reservation_id, 401, error_code => 'invalid_api_key')",
    "SELECT keypool_enable_keys('attack')",
    "SELECT keypool_settle((keypool_reserve('u6', 'attack')).reservation_id, 402, error_code => 'insufficient_quota')",
    "SELECT keypool_enable_keys()",
    "SELECT keypool_check_alerts()",
    "SELECT keypool_flush()",
    "SELECT keypool_save_state()",
    "SELECT keypool_grant('attack', 'postgres', 'read')",
    "SELECT keypool_revoke('attack', 'postgres', 'read')",
    "SELECT keypool_rotate_master_key()",
    "SELECT keypool_remove_key((SELECT max(key_id) FROM keypool_keys WHERE pool = 'attack'))",
    "SELECT * FROM keypool_status()",
    "SELECT keypool_now()",
    "SELECT keypool_classify(429, 'rate_limit_exceeded')",
    "SELECT count(*) FROM keypool_keys",
    "SELECT count(*) FROM keypool_scopes",
    "SELECT count(*) FROM keypool_usage",
    "SELECT count(*) FROM keypool_events",
    "SELECT count(*) FROM keypool_members",
    "SELECT count(*) FROM keypool_pool_stats",
    "SELECT count(*) FROM keypool_key_stats",
    "SELECT count(*) FROM keypool_alerts",
    "SELECT count(*) FROM keypool_health",
    "SELECT count(*) FROM keypool_prices",
    "SELECT count(*) FROM keypool_requests",
    "SELECT count(*) FROM keypool_queue_depth",
    "SELECT count(*) FROM keypool_workers",
    "SELECT count(*) FROM keypool_grants",
    "SELECT count(*) FROM keypool_master_keys",
    "SELECT count(*) FROM keypool_member_memory",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alikes_planted_by_a_caller_never_run_with_the_owners_rights() {
    let cluster = shared();
    let db = cluster.fresh_db().await;
    let attacker = format!("{}_attacker", db.name);
    // The attacker: a login role with every grant the book describes, administrator of every
    // pool, owner of a schema of its own and allowed to create in public.
    exec(
        &db.client,
        &format!(
            "CREATE ROLE {attacker} LOGIN;
             CREATE SCHEMA s AUTHORIZATION {attacker};
             GRANT CREATE ON SCHEMA public TO {attacker};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {attacker};
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {attacker};
             GRANT USAGE ON SCHEMA keypool TO {attacker};
             GRANT EXECUTE ON FUNCTION keypool.scope_state(), keypool.key_state(), keypool.pool_state(),
                 keypool.health(), keypool.member_memory() TO {attacker};
             SELECT keypool_create_pool('attack', min_share => 1);
             SELECT keypool_grant('*', '{attacker}', 'admin');"
        ),
    )
    .await;
    let conninfo = cluster
        .conninfo(&db.name)
        .replace("user=postgres", &format!("user={attacker}"));
    let att = keypool_tests::connect(&conninfo)
        .await
        .expect("connect as the attacker");
    exec(
        &att,
        "CREATE TABLE s.hits (who text, what text);
         GRANT ALL ON s.hits TO PUBLIC;
         CREATE TABLE s.users (id text PRIMARY KEY, grp integer);
         CREATE TABLE s.legacy (id text PRIMARY KEY, grp integer);
         INSERT INTO s.legacy SELECT 'legacy-' || i FROM generate_series(1, 30) i;
         CREATE TRIGGER assign BEFORE INSERT ON s.users FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('attack', 'id', 'grp');",
    )
    .await;
    exec(&att, &planting("s")).await;
    exec(&att, &planting("public")).await;
    exec(&att, "SET search_path = s, public, pg_catalog").await;
    // The planted objects are live: the attacker's own statements run them (as itself).
    exec(&att, "SELECT left('abc', 1), 1::bigint = 1::bigint, now()").await;
    let own = one::<i64>(&att, "SELECT count(*) FROM s.hits").await;
    assert!(own >= 3, "the planted look-alikes did not take effect ({own} hits)");

    // Two keys, added with the secret as a parameter.
    for secret in ["sk-planted-attack-key-000001", "sk-planted-attack-key-000002"] {
        att.execute(
            "SELECT keypool_add_key('attack', 'openai', $1, rpm => 1000, rpd => 100000)",
            &[&secret],
        )
        .await
        .unwrap_or_else(|e| panic!("add key: {e:?}"));
    }
    for sql in ENTRY_POINTS {
        att.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("as the attacker: {sql}: {e:?}"));
    }

    // The background runs as a superuser: a search path the database's owner sets must not
    // reach it either. A flush (history) and the upkeep (alerts) run within a flush interval.
    exec(
        &db.client,
        &format!("ALTER DATABASE {} SET search_path = s, public, pg_catalog", db.name),
    )
    .await;
    let before = one::<i64>(&db.client, "SELECT count(*) FROM keypool.event WHERE kind = 'alert'").await;
    exec(
        &att,
        "SELECT keypool_settle((keypool_reserve('u7', 'attack')).reservation_id, 401, error_code => 'invalid_api_key')",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let alerts = one::<i64>(&db.client, "SELECT count(*) FROM keypool.event WHERE kind = 'alert'").await;
        let flushed = one::<i64>(&db.client, "SELECT count(*) FROM keypool.usage_hourly").await;
        if alerts > before && flushed > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no background flush and alert check within 40 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let escalated: Vec<String> = db
        .client
        .query(
            &format!("SELECT DISTINCT who || ' ran ' || what FROM s.hits WHERE who <> '{attacker}' ORDER BY 1"),
            &[],
        )
        .await
        .expect("hits")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        escalated.is_empty(),
        "planted objects ran with other rights: {escalated:?}"
    );
    let superuser: bool = db
        .client
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&attacker])
        .await
        .unwrap()
        .get(0);
    assert!(!superuser);
    drop(att);
    exec(
        &db.client,
        &format!(
            "ALTER DATABASE {} RESET search_path; DROP OWNED BY {attacker}; DROP ROLE {attacker};",
            db.name
        ),
    )
    .await;
}

#[tokio::test]
async fn a_role_with_use_on_one_pool_reaches_nothing_else() {
    let cluster = shared();
    let db = cluster.fresh_db().await;
    let (app, other) = (format!("{}_app", db.name), format!("{}_other", db.name));
    exec(
        &db.client,
        &format!(
            "CREATE ROLE {app} LOGIN; CREATE ROLE {other} LOGIN;
             GRANT EXECUTE ON FUNCTION keypool_reserve(text, text, bigint, text[]),
                 keypool_settle(bigint, integer, bigint, bigint, bigint, text, bigint, bigint, bigint, bigint), keypool_release(bigint)
               TO {app}, {other};
             SELECT keypool_create_pool('a'); SELECT keypool_create_pool('b');
             SELECT keypool_add_key('a', 'openai', 'sk-pool-a-secret-0000000001');
             SELECT keypool_add_key('b', 'openai', 'sk-pool-b-secret-0000000002');
             SELECT keypool_grant('a', '{app}'); SELECT keypool_grant('a', '{other}');"
        ),
    )
    .await;
    let connect = |role: &str| {
        let conninfo = cluster
            .conninfo(&db.name)
            .replace("user=postgres", &format!("user={role}"));
        async move { keypool_tests::connect(&conninfo).await.expect("connect") }
    };
    let a = connect(&app).await;
    let o = connect(&other).await;
    // Pool b, and a pool that does not exist: the same refusal, naming nothing else.
    let mut messages = Vec::new();
    for pool in ["b", "does-not-exist"] {
        let err = a
            .query_one("SELECT * FROM keypool_reserve('u', $1)", &[&pool])
            .await
            .expect_err("reserved in a pool without use");
        let e = err.as_db_error().expect("a server error");
        assert_eq!(e.code().code(), "42501", "{e:?}");
        assert!(!format!("{e:?}").contains("sk-pool"), "{e:?}");
        messages.push(e.message().replace(pool, "<pool>"));
    }
    assert_eq!(messages[0], messages[1]);
    // Walking reservation ids never reaches another role's: no settle, no release, no secret.
    let row = a
        .query_one("SELECT reservation_id, secret FROM keypool_reserve('u', 'a')", &[])
        .await
        .unwrap();
    let id: i64 = row.get(0);
    assert_eq!(row.get::<_, String>(1), "sk-pool-a-secret-0000000001");
    for sql in [
        "SELECT keypool_settle($1, 429, retry_after_ms => 600000)",
        "SELECT keypool_release($1)",
    ] {
        let err = o.query_one(sql, &[&id]).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err:?}");
    }
    for delta in [-2i64, -1, 1, 2] {
        let err = o
            .query_one("SELECT keypool_settle($1, 200)", &[&(id + delta)])
            .await
            .expect_err("settled a reservation that is not its own");
        assert!(
            matches!(err.code().map(|c| c.code()), Some("42501") | Some("42704")),
            "{err:?}"
        );
    }
    // The owner still settles it, and the scope did not cool.
    let outcome: String = a
        .query_one("SELECT keypool_settle($1, 200)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "success");
    assert_eq!(
        one::<i64>(
            &db.client,
            "SELECT count(*) FROM keypool_scopes WHERE cooling_until IS NOT NULL"
        )
        .await,
        0
    );
    drop((a, o));
    exec(
        &db.client,
        &format!("DROP OWNED BY {app}, {other}; DROP ROLE {app}; DROP ROLE {other};"),
    )
    .await;
}

/// Whether `needle` occurs in any file under `dir`.
fn files_containing(dir: &Path, needle: &[u8], found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_containing(&path, needle, found);
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
}

#[tokio::test]
async fn secrets_are_ciphertext_in_dumps_and_in_every_file_of_the_data_directory() {
    let cluster = shared();
    let db = cluster.fresh_db().await;
    let secret = format!("sk-proj-AtRest-{}-Zq81Lm", db.name);
    exec(&db.client, "SELECT keypool_create_pool('rest')").await;
    db.client
        .execute("SELECT keypool_add_key('rest', 'openai', $1)", &[&secret])
        .await
        .expect("add key");
    // Granted roles still get it back.
    let back: String = db
        .client
        .query_one("SELECT secret FROM keypool_reserve('u', 'rest')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back, secret);
    let sealed: i64 = one::<i64>(&db.client, "SELECT length(secret_sealed)::bigint FROM keypool.key").await;
    assert!(sealed > secret.len() as i64, "the sealed secret is {sealed} bytes");

    let dump = cluster.pg_dump(&db.name);
    assert!(dump.contains("keypool.key"), "the dump holds the keys table");
    assert!(!dump.contains(&secret), "pg_dump holds the plaintext secret");
    exec(&db.client, "CHECKPOINT").await;
    let mut found = Vec::new();
    files_containing(&cluster.data_dir(), secret.as_bytes(), &mut found);
    assert!(found.is_empty(), "plaintext secret in {found:?}");
    // The keyring exists, private to the server's user.
    let keyring = cluster.data_dir().join("pg_keypool.keyring");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&keyring).expect("keyring").permissions());
    assert_eq!(mode & 0o777, 0o600);
}
