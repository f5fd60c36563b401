//! The worker's other commands and its start-up checks: import-env (idempotent, masked output),
//! validate (disables keys the provider rejects; checks a key before adding it), the warning on
//! an extension version mismatch, and clear errors for a missing extension or bad settings.

mod common;

use std::process::{Command, Output};

use common::*;
use keypool_tests::{shared, TestDb};

fn run(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path) -> Output {
    Command::new(bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("run keypool-worker")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("keypool-commands-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

async fn key_rows(db: &TestDb<'_>) -> Vec<(String, String, i32, String)> {
    db.client
        .query(
            "SELECT pool, provider, group_no, label FROM keypool_keys ORDER BY pool, group_no",
            &[],
        )
        .await
        .expect("keypool_keys")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn import_env_reads_the_seed_formats_once() {
    let db = shared().fresh_db().await;
    let url = conninfo(&db);
    let dir = temp_dir("import");
    std::fs::write(
        dir.join(".env"),
        "# seed 002\nSERP_API_KEYS=serp-key-one-000001,serp-key-two-000002\nSERP_MAX_TOKENS_PER_MINUTE_0=100\n\
         SERP_MAX_TOKENS_PER_DAY_0=100000\nOPENAI_API_KEYS=sk-proj-env-a-00000001\nOPENAI_MODEL_0=gpt-4o\n\
         OPENAI_MAX_TOKENS_PER_MINUTE_0=90000\n",
    )
    .expect("write .env");
    let env = [
        ("KEYPOOL_DATABASE_URL", url.as_str()),
        ("XAI_API_KEY", "xai-original-00000001"),
        ("XAI_API_KEY_2", "xai-second-0000000002"),
        ("XAI_API_KEY_3", "xai-third-00000000003"),
        ("GOOGLE_KEY_1", "AIzaSy-google-0000001"),
        ("GOOGLE_KEY_2", "AIzaSy-google-0000002"),
        ("GOOGLE_KEY_3", "AIzaSy-google-0000003"),
        ("GOOGLE_KEY_4", "AIzaSy-google-0000004"),
        ("GOOGLE_KEY_7", "AIzaSy-google-0000007"),
        ("GEMINI_API_KEY_1", "your_first_api_key_here"),
    ];
    let args = [
        "import-env",
        "--pool-map",
        "chat=1-2,artifact=3-6,image=7-10",
        "--rpm",
        "15",
    ];
    let first = run(&args, &env, &dir);
    let out = text(&first);
    assert!(first.status.success(), "{out}");
    assert!(
        out.contains("11 keys added, 0 already present, 6 pools created"),
        "{out}"
    );
    assert!(out.contains("GEMINI_API_KEY_1 looks like a placeholder"), "{out}");
    for (_, secret) in env.iter().skip(1) {
        assert!(!out.contains(secret), "secret in the output: {out}");
    }

    let second = run(&args, &env, &dir);
    let out = text(&second);
    assert!(second.status.success(), "{out}");
    assert!(
        out.contains("0 keys added, 11 already present, 0 pools created"),
        "{out}"
    );

    let keys = key_rows(&db).await;
    let groups = |pool: &str| keys.iter().filter(|k| k.0 == pool).map(|k| k.2).collect::<Vec<_>>();
    // Seed 004: XAI_API_KEY is group 1, XAI_API_KEY_n is group n.
    assert_eq!(groups("xai"), [1, 2, 3]);
    assert!(
        keys.iter().any(|k| k.0 == "xai" && k.2 == 1 && k.3 == "xai-…0001"),
        "{keys:?}"
    );
    // Seed 003: the pool map; groups are positions in the pool.
    assert_eq!(groups("chat"), [1, 2]);
    assert_eq!(groups("artifact"), [1, 2]);
    assert_eq!(groups("image"), [1]);
    assert!(keys
        .iter()
        .filter(|k| ["chat", "artifact", "image"].contains(&k.0.as_str()))
        .all(|k| k.1 == "gemini"));
    // Seed 002, from the .env file.
    assert_eq!(groups("serp"), [1, 2]);
    assert_eq!(groups("openai"), [1]);
    let limits = db
        .client
        .query_one(
            "SELECT s.rpm, s.rpd, s.tpm, k.model FROM keypool_scopes s JOIN keypool_keys k USING (scope_id)
              WHERE k.pool = 'serp' AND k.group_no = 1",
            &[],
        )
        .await
        .expect("serp limits");
    assert_eq!(limits.get::<_, Option<i32>>(0), Some(100));
    assert_eq!(limits.get::<_, Option<i32>>(1), Some(100_000));
    assert_eq!(limits.get::<_, Option<i64>>(2), None);
    let openai = db
        .client
        .query_one(
            "SELECT s.rpm, s.tpm, k.model FROM keypool_scopes s JOIN keypool_keys k USING (scope_id) WHERE k.pool = 'openai'",
            &[],
        )
        .await
        .expect("openai limits");
    assert_eq!(openai.get::<_, Option<i32>>(0), Some(15));
    assert_eq!(openai.get::<_, Option<i64>>(1), Some(90_000));
    assert_eq!(openai.get::<_, Option<String>>(2).as_deref(), Some("gpt-4o"));

    // A dry run changes nothing.
    let dry = run(
        &["import-env", "--dry-run", "--no-env-file"],
        &[
            ("KEYPOOL_DATABASE_URL", url.as_str()),
            ("XAI_API_KEY_9", "xai-ninth-0000000009"),
        ],
        &dir,
    );
    assert!(text(&dry).contains("would add"), "{}", text(&dry));
    assert_eq!(key_rows(&db).await.len(), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_disables_rejected_keys_and_checks_a_key_before_it_is_added() {
    let db = shared().fresh_db().await;
    let mock = Mock::start(&[]);
    exec(
        &db,
        &format!(
            "SELECT keypool_create_pool('chat');
             SELECT keypool_add_key('chat', 'openai', 'sk-valid-key-00000001', base_url => '{u}/v1');
             SELECT keypool_add_key('chat', 'openai', 'sk-invalid-key-000002', base_url => '{u}/v1');
             SELECT keypool_add_key('chat', 'gemini', 'AIza-invalid-key-0003', 'gemini-2.5-flash', base_url => '{u}');
             SELECT keypool_add_key('chat', 'anthropic', 'sk-ant-valid-0000004', base_url => '{u}');
             SELECT keypool_add_key('chat', 'gemini', 'AIza-ratelimited-0005', base_url => '{u}');",
            u = mock.url
        ),
    )
    .await;
    let url = conninfo(&db);
    let dir = temp_dir("validate");
    let env = [("KEYPOOL_DATABASE_URL", url.as_str())];
    let out = run(&["validate"], &env, &dir);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("3 accepted, 2 rejected, 0 not known"), "{t}");
    assert!(!t.contains("sk-invalid-key-000002"), "{t}");
    let states: Vec<(i64, String)> = db
        .client
        .query("SELECT key_id, state FROM keypool_keys ORDER BY key_id", &[])
        .await
        .expect("keys")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let states: Vec<&str> = states.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(states, ["active", "disabled", "disabled", "active", "active"]);
    let reason = value(&db, "SELECT reason FROM keypool_keys WHERE key_id = 3")
        .await
        .unwrap_or_default();
    assert!(reason.contains("API_KEY_INVALID"), "{reason}");

    let again = run(&["validate", "--pool", "chat"], &env, &dir);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(text(&again).contains("skipped: disabled"));

    // One key, before it joins a pool (seed 001).
    let base = format!("{}/v1", mock.url);
    let check = |secret: &'static str, add: bool| {
        let mut args = vec![
            "validate",
            "--provider",
            "openai",
            "--base-url",
            &base,
            "--secret-env",
            "CANDIDATE",
        ];
        if add {
            args.extend(["--add-to", "chat"]);
        }
        let env = [("KEYPOOL_DATABASE_URL", url.as_str()), ("CANDIDATE", secret)];
        run(&args, &env, &dir)
    };
    let bad = check("sk-invalid-candidate-01", true);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(text(&bad).contains("rejected: key_invalid"), "{}", text(&bad));
    let good = check("sk-fine-candidate-0002", true);
    assert_eq!(good.status.code(), Some(0), "{}", text(&good));
    assert!(text(&good).contains("added as key 6 to pool chat"), "{}", text(&good));
    assert_eq!(
        value(&db, "SELECT count(*) FROM keypool_keys").await.as_deref(),
        Some("6")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_warns_about_a_version_mismatch_and_refuses_a_database_without_the_extension() {
    let db = shared().fresh_db().await;
    exec(
        &db,
        "UPDATE pg_extension SET extversion = '0.0.1' WHERE extname = 'pg_keypool'",
    )
    .await;
    // The worker says which versions differ; the extension's library itself refuses to work
    // with SQL objects of another version, and says what to run.
    let dir = temp_dir("olddb");
    let url = conninfo(&db);
    let out = run(
        &["serve", "--insecure-no-auth", "--no-queue", "--listen", "127.0.0.1:0"],
        &[("KEYPOOL_DATABASE_URL", url.as_str())],
        &dir,
    );
    let log = text(&out);
    assert!(
        log.contains(&format!(
            "the database has pg_keypool 0.0.1 but this worker was built for {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{log}"
    );
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("SQL objects in this database are version 0.0.1")
            && log.contains("ALTER EXTENSION pg_keypool UPDATE"),
        "{log}"
    );

    let admin = db.cluster.connect("postgres").await;
    admin
        .batch_execute("DROP DATABASE IF EXISTS no_extension")
        .await
        .expect("drop database");
    admin
        .batch_execute("CREATE DATABASE no_extension")
        .await
        .expect("create database");
    let dir = temp_dir("noext");
    let url = db.cluster.conninfo("no_extension");
    let out = run(
        &["serve", "--insecure-no-auth"],
        &[("KEYPOOL_DATABASE_URL", url.as_str())],
        &dir,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("pg_keypool is not installed in the database no_extension"),
        "{}",
        text(&out)
    );
    admin.batch_execute("DROP DATABASE no_extension").await.expect("drop");

    let out = run(
        &["serve", "--metrics-token", "tiny-secret"],
        &[("KEYPOOL_DATABASE_URL", url.as_str())],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("metrics token") && !text(&out).contains("tiny-secret"),
        "{}",
        text(&out)
    );
    let out = run(&["serve", "--insecure-no-auth"], &[], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("--database-url"), "{}", text(&out));
}
