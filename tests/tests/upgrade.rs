//! Upgrades: an installation of 0.1.0 (the frozen install script, data as 0.1.0 stored it)
//! goes through every later frozen release (pg_keypool/sql/pg_keypool--<version>.sql) to the
//! current version with `ALTER EXTENSION pg_keypool UPDATE [TO ...]`: after each step its objects
//! are exactly those of a fresh install of that version, and at the end its data is all there
//! and its plaintext secrets are sealed. Each release frozen later joins the loop by itself, so
//! every change of the SQL objects needs its upgrade script.

use keypool_tests::{exec, one, shared};
use tokio_postgres::Client;

/// Lines describing every object of the extension (see the file).
const CATALOG: &str = include_str!("../sql/extension_catalog.sql");

/// The frozen releases, oldest first: the install scripts in pg_keypool/sql/.
fn frozen_releases() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../pg_keypool/sql");
    let mut versions: Vec<Vec<u32>> = std::fs::read_dir(dir)
        .expect("read pg_keypool/sql")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let version = name.strip_prefix("pg_keypool--")?.strip_suffix(".sql")?;
            // Upgrade scripts (from--to) are not releases.
            (!version.contains("--")).then(|| version.split('.').map(|p| p.parse().unwrap_or(0)).collect())
        })
        .collect();
    versions.sort();
    versions
        .iter()
        .map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
        .collect()
}

async fn catalog(client: &Client) -> Vec<String> {
    client
        .query(CATALOG, &[])
        .await
        .expect("describe the extension")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// What 0.1.0 stored: pools, an account shared by two keys, a key of its own, members, hourly
/// history, events, prices, queued and finished requests, a worker. Inserted as 0.1.0's
/// functions did, into its tables (the current library refuses to run 0.1.0's functions).
const DATA_OF_0_1_0: &str = "
INSERT INTO keypool.pool (name, min_share) VALUES ('chat', 5), ('other', 0);
INSERT INTO keypool.scope (provider, account, model, rpm, rpd) VALUES ('openai', 'org-a', 'gpt-4o-mini', 10, 100);
INSERT INTO keypool.scope (provider, model, timezone) VALUES ('gemini', 'gemini-2.5-flash', 'America/Los_Angeles');
INSERT INTO keypool.key (pool_id, scope_id, provider, model, base_url, secret, secret_sha256, label, group_no)
VALUES (1, 1, 'openai', 'gpt-4o-mini', 'https://api.openai.com/v1', 'sk-proj-upgraded-secret-0001',
        sha256('sk-proj-upgraded-secret-0001'), 'sk-p…0001', 1),
       (1, 1, 'openai', 'gpt-4o-mini', 'https://api.openai.com/v1', 'sk-proj-upgraded-secret-0002',
        sha256('sk-proj-upgraded-secret-0002'), 'sk-p…0002', 2),
       (2, 2, 'gemini', 'gemini-2.5-flash', 'https://generativelanguage.googleapis.com', 'AIzaSy-upgraded-secret-0003',
        sha256('AIzaSy-upgraded-secret-0003'), 'AIza…0003', 1);
INSERT INTO keypool.member (pool_id, user_id, user_hash, key_id, weight) VALUES (1, 'u1', 101, 1, 1), (1, 'u2', 102, 2, 5);
INSERT INTO keypool.usage_hourly (key_id, hour, requests, prompt_tokens, completion_tokens, success)
VALUES (1, '2026-11-01 10:00+00', 7, 70, 35, 7), (3, '2026-11-01 11:00+00', 2, 20, 10, 2);
INSERT INTO keypool.event (at, kind, pool_id, key_id) VALUES ('2026-11-01 09:00+00', 'key_added', 1, 1);
INSERT INTO keypool.price (provider, model, input_per_million, output_per_million) VALUES ('openai', '', 0.15, 0.6);
INSERT INTO keypool.request (user_id, pool, request, max_attempts, deadline)
VALUES ('u1', 'chat', '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}', 3, now() + interval '1 hour');
INSERT INTO keypool.request (user_id, pool, request, max_attempts, deadline, status, response, finished_at)
VALUES ('u2', 'chat', '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}', 3, now() + interval '1 hour', 'done', '{\"ok\": true}', now());
INSERT INTO keypool.worker (id, version, started_at, last_seen) VALUES ('w-0.1.0', '0.1.0', now(), now());
";

#[tokio::test]
async fn an_installation_of_0_1_0_upgrades_with_everything_kept_and_its_secrets_sealed() {
    let cluster = shared();
    let admin = cluster.connect("postgres").await;
    let (old, fresh) = (
        format!("upgrade_old_{}", std::process::id()),
        format!("upgrade_fresh_{}", std::process::id()),
    );
    for sql in [
        format!("DROP DATABASE IF EXISTS {old}"),
        format!("DROP DATABASE IF EXISTS {fresh}"),
        format!("CREATE DATABASE {old}"),
        format!("CREATE DATABASE {fresh}"),
    ] {
        exec(&admin, &sql).await;
    }
    let c = cluster.connect(&old).await;
    exec(&c, "CREATE EXTENSION pg_keypool VERSION '0.1.0'").await;
    exec(&c, DATA_OF_0_1_0).await;

    // Until the update, the library refuses to work with 0.1.0's objects, and says what to do.
    let err = c
        .query_one("SELECT * FROM keypool_reserve('u1', 'chat')", &[])
        .await
        .expect_err("the library ran against 0.1.0's objects");
    let e = err.as_db_error().expect("a server error");
    assert_eq!(e.code().code(), "55000");
    assert!(e.message().contains("version 0.1.0"), "{e:?}");
    assert_eq!(e.hint(), Some("ALTER EXTENSION pg_keypool UPDATE;"));

    // Every frozen release after 0.1.0, then the current version.
    let releases = frozen_releases();
    assert_eq!(releases.first().map(String::as_str), Some("0.1.0"), "{releases:?}");
    let current = env!("CARGO_PKG_VERSION").to_string();
    assert!(
        !releases.contains(&current),
        "{current} is frozen: the crate's version must move on"
    );
    let steps: Vec<String> = releases[1..].iter().cloned().chain([current.clone()]).collect();
    let f = cluster.connect(&fresh).await;
    for version in &steps {
        if version == &current {
            exec(&c, "ALTER EXTENSION pg_keypool UPDATE").await;
        } else {
            // Not the library's version: it refuses to run them until the last step.
            exec(&c, &format!("ALTER EXTENSION pg_keypool UPDATE TO '{version}'")).await;
        }
        let now: String = one(&c, "SELECT extversion FROM pg_extension WHERE extname = 'pg_keypool'").await;
        assert_eq!(&now, version);
        // Exactly the objects of a fresh install of that version: tables, columns, constraints,
        // indexes, triggers, sequences, functions (bodies, settings, comments), views,
        // privileges, dumped tables.
        exec(&f, "DROP EXTENSION IF EXISTS pg_keypool CASCADE").await;
        exec(&f, &format!("CREATE EXTENSION pg_keypool VERSION '{version}'")).await;
        let (upgraded, installed) = (catalog(&c).await, catalog(&f).await);
        let missing: Vec<&String> = installed.iter().filter(|l| !upgraded.contains(l)).collect();
        let extra: Vec<&String> = upgraded.iter().filter(|l| !installed.contains(l)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "the upgrade to {version} differs from a fresh install of it.\nmissing: {missing:#?}\nextra: {extra:#?}"
        );
    }

    // The data is all there; secrets are sealed, labels new, the plaintext gone.
    let labels: Vec<String> = c
        .query("SELECT label FROM keypool_keys ORDER BY key_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(labels, ["sk-proj-…0001", "sk-proj-…0002", "AIza…0003"]);
    let plaintext: i64 = one(
        &c,
        "SELECT count(*) FROM keypool.key k WHERE row_to_json(k)::text LIKE '%upgraded-secret%'",
    )
    .await;
    assert_eq!(plaintext, 0);
    let sealed: i64 = one(&c, "SELECT secrets FROM keypool_master_keys").await;
    assert_eq!(sealed, 3);
    let secret: String = one(&c, "SELECT secret FROM keypool_reserve('u9', 'other')").await;
    assert_eq!(secret, "AIzaSy-upgraded-secret-0003");
    let mut chat: Vec<String> = Vec::new();
    for u in ["u1", "u2", "u3"] {
        chat.push(
            c.query_one("SELECT secret FROM keypool_reserve($1, 'chat')", &[&u])
                .await
                .unwrap()
                .get(0),
        );
    }
    assert!(
        chat.iter().all(|s| s.starts_with("sk-proj-upgraded-secret-000")),
        "{chat:?}"
    );
    assert_eq!(one::<i64>(&c, "SELECT keypool_assign('u2', 'chat')").await, 2);
    assert_eq!(one::<i64>(&c, "SELECT count(*) FROM keypool_members").await, 2);
    assert_eq!(
        one::<i64>(&c, "SELECT sum(requests)::bigint FROM keypool_usage").await,
        9
    );
    assert_eq!(
        one::<i64>(
            &c,
            "SELECT count(*) FROM keypool_usage_report('2026-11-01', '2026-11-01') WHERE estimated_cost > 0"
        )
        .await,
        1
    );
    assert_eq!(
        one::<i64>(&c, "SELECT count(*) FROM keypool_events WHERE kind = 'key_added'").await,
        1
    );
    // Requests and workers belong to the extension's owner.
    assert_eq!(
        one::<String>(
            &c,
            "SELECT string_agg(DISTINCT submitted_by::text, ',') FROM keypool_requests"
        )
        .await,
        "postgres"
    );
    assert_eq!(one::<String>(&c, "SELECT status FROM keypool_result(2)").await, "done");
    assert_eq!(
        one::<String>(&c, "SELECT role::text FROM keypool_workers").await,
        "postgres"
    );
    // New rows are numbered after the old ones.
    let key: i64 = c
        .query_one(
            "SELECT keypool_add_key('chat', 'openai', $1)",
            &[&"sk-proj-after-upgrade-0004"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, 4);
    assert_eq!(one::<i64>(&c, "SELECT keypool_create_pool('after')").await, 3);
    // And a dump holds no plaintext.
    let dump = cluster.pg_dump(&old);
    assert!(!dump.contains("upgraded-secret"), "the dump holds a plaintext secret");

    drop((c, f));
    exec(&admin, &format!("DROP DATABASE {old} WITH (FORCE)")).await;
    exec(&admin, &format!("DROP DATABASE {fresh} WITH (FORCE)")).await;
}
