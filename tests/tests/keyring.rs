//! The keyring: a cluster whose keyring file is missing or different refuses with a clear error
//! (naming the key and the setting) instead of making a new key; rotation reseals every secret;
//! a dump restores on a cluster that has the same keyring, and only there.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use keypool_tests::{exec, Cluster};
use tokio_postgres::Client;

async fn secret_of(client: &Client, user: &str) -> Result<String, tokio_postgres::Error> {
    client
        .query_one("SELECT secret FROM keypool_reserve($1, 'vault')", &[&user])
        .await
        .map(|r| r.get(0))
}

/// The error a reservation gets, as "SQLSTATE: message | detail | hint".
async fn refusal(client: &Client) -> String {
    let err = secret_of(client, "refused")
        .await
        .expect_err("reserved without the keyring");
    let e = err.as_db_error().expect("a server error");
    format!(
        "{}: {} | {} | {}",
        e.code().code(),
        e.message(),
        e.detail().unwrap_or(""),
        e.hint().unwrap_or("")
    )
}

/// Writes `text` as a file the server can read, mode 0600.
fn write_for_postgres(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let ok = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(ok.success());
}

#[tokio::test]
async fn a_missing_or_different_keyring_is_refused_and_rotation_reseals_every_secret() {
    let cluster = Cluster::start("keyring", &[]);
    let db = cluster.fresh_db().await;
    let keyring = cluster.data_dir().join("pg_keypool.keyring");
    assert!(!keyring.exists(), "a keyring before any secret was sealed");
    exec(&db.client, "SELECT keypool_create_pool('vault')").await;
    for secret in ["sk-proj-vault-secret-0001", "sk-proj-vault-secret-0002"] {
        db.client
            .execute("SELECT keypool_add_key('vault', 'openai', $1)", &[&secret])
            .await
            .expect("add key");
    }
    // The first sealed secret made the keyring: private, one key.
    let mode = std::fs::metadata(&keyring).expect("keyring").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let original = std::fs::read_to_string(&keyring).unwrap();
    assert_eq!(original.lines().filter(|l| !l.starts_with('#')).count(), 1);
    assert!(secret_of(&db.client, "u1")
        .await
        .unwrap()
        .starts_with("sk-proj-vault-secret-"));

    // Rotation: a second key; every secret resealed with it; the first is no longer needed here.
    let new: i32 = db
        .client
        .query_one("SELECT keypool_rotate_master_key()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(new, 2);
    let rows = db
        .client
        .query("SELECT key_no, secrets FROM keypool_master_keys ORDER BY key_no", &[])
        .await
        .unwrap();
    let keys: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(keys, vec![(2, 2)]);
    let rotated = std::fs::read_to_string(&keyring).unwrap();
    assert_eq!(rotated.lines().filter(|l| !l.starts_with('#')).count(), 2);
    let mut secrets = vec![
        secret_of(&db.client, "u2").await.unwrap(),
        secret_of(&db.client, "u3").await.unwrap(),
    ];
    secrets.sort();
    assert_eq!(secrets, ["sk-proj-vault-secret-0001", "sk-proj-vault-secret-0002"]);
    // The same secret added again is recognised under the new key.
    let again: i64 = db
        .client
        .query_one(
            "SELECT keypool_add_key('vault', 'openai', $1)",
            &[&"sk-proj-vault-secret-0001"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        again,
        db.client
            .query_one("SELECT min(key_id) FROM keypool_keys", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    );

    // A keyring others may read is refused (a new session reads the file again).
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = cluster.connect(&db.name).await;
    let why = refusal(&c).await;
    assert!(
        why.starts_with("F0000: pg_keypool's keyring file") && why.contains("open to other users"),
        "{why}"
    );
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = cluster.connect(&db.name).await;
    assert!(secret_of(&c, "u5").await.unwrap().starts_with("sk-proj-vault-secret-"));

    // A different keyring (keys of the same numbers, other bytes): refused, saying which key.
    cluster.stop();
    let forged: String = rotated
        .lines()
        .map(|l| match l.split_once(' ') {
            Some((n, hex)) if !l.starts_with('#') => format!("{n} {}", hex.chars().rev().collect::<String>()),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    write_for_postgres(&keyring, &forged);
    cluster.start_again();
    let c = cluster.connect(&db.name).await;
    let why = refusal(&c).await;
    assert!(
        why.starts_with("55000: pg_keypool's master key 2 in") && why.contains("is not the key this database"),
        "{why}"
    );
    assert!(why.contains("pg_keypool.master_key_file"), "{why}");

    // No keyring at all: refused, and adding a key does not make a new one.
    cluster.stop();
    std::fs::remove_file(&keyring).unwrap();
    cluster.start_again();
    let c = cluster.connect(&db.name).await;
    let why = refusal(&c).await;
    assert!(why.starts_with("55000: pg_keypool's master key 2 is missing"), "{why}");
    assert!(why.contains("pg_keypool.master_key_file"), "{why}");
    let err = c
        .execute(
            "SELECT keypool_add_key('vault', 'openai', $1)",
            &[&"sk-proj-vault-secret-0003"],
        )
        .await
        .expect_err("added a key without the keyring");
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err:?}");
    assert!(!keyring.exists(), "a new keyring was made while sealed secrets exist");

    // The right keyring back: everything works again.
    cluster.stop();
    write_for_postgres(&keyring, &rotated);
    cluster.start_again();
    let c = cluster.connect(&db.name).await;
    assert!(secret_of(&c, "u4").await.unwrap().starts_with("sk-proj-vault-secret-"));
}

#[tokio::test]
async fn a_dump_restores_on_a_cluster_with_the_same_keyring_and_only_there() {
    let source = Cluster::start("dump-source", &[]);
    let db = source.fresh_db().await;
    exec(&db.client, "SELECT keypool_create_pool('vault', min_share => 3)").await;
    db.client
        .execute(
            "SELECT keypool_add_key('vault', 'openai', $1, rpd => 100)",
            &[&"sk-proj-dumped-secret-0001"],
        )
        .await
        .expect("add key");
    exec(
        &db.client,
        "SELECT keypool_assign('member-1', 'vault'); SELECT keypool_grant('vault', 'postgres', 'read');",
    )
    .await;
    let dump = source.pg_dump(&db.name);
    assert!(!dump.contains("sk-proj-dumped-secret-0001"));

    let target = Cluster::start("dump-target", &[]);
    let admin = target.connect("postgres").await;
    exec(&admin, "CREATE DATABASE restored").await;
    target.psql_script("restored", &dump);
    let c = target.connect("restored").await;
    // The target cluster has no keyring of its own: the restored secrets stay sealed.
    let why = refusal(&c).await;
    assert!(why.starts_with("55000: pg_keypool's master key 1 is missing"), "{why}");
    // With the source's keyring, the restore is whole: secrets, members, grants, and new rows
    // numbered after the restored ones.
    target.stop();
    let keyring = std::fs::read_to_string(source.data_dir().join("pg_keypool.keyring")).unwrap();
    write_for_postgres(&target.data_dir().join("pg_keypool.keyring"), &keyring);
    target.start_again();
    let c = target.connect("restored").await;
    assert_eq!(secret_of(&c, "u1").await.unwrap(), "sk-proj-dumped-secret-0001");
    let members: i64 = c
        .query_one("SELECT count(*) FROM keypool_members WHERE pool = 'vault'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(members, 1);
    let grants: i64 = c
        .query_one("SELECT count(*) FROM keypool_grants WHERE pool = 'vault'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(grants, 1);
    let added: i64 = c
        .query_one(
            "SELECT keypool_add_key('vault', 'openai', $1)",
            &[&"sk-proj-after-restore-0002"],
        )
        .await
        .expect("add a key after the restore")
        .get(0);
    assert!(added > 1, "new key id {added}");
    exec(&c, "SELECT keypool_create_pool('after-restore')").await;
}
