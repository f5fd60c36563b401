//! Secrets at rest in this database: every provider secret is sealed (seal.rs) under a master
//! key of the cluster's keyring (keyring.rs); `keypool.master_key` records the fingerprint of
//! each master key this database used, so that a cluster whose keyring is missing or different
//! refuses with a clear error instead of silently making a new key. Plaintext exists only in
//! backend memory: in a configuration cache (config.rs) and in `keypool_reserve`'s answer.
//!
//! New secrets are sealed with the newest master key this database recorded; the first key is
//! recorded (and the keyring created, if the cluster has none) when the database seals its
//! first secret. `keypool_rotate_master_key()` adds a key to the keyring and reseals the
//! database's secrets with it; keys no secret of the database needs any more are forgotten by
//! the database (the keyring keeps them: other databases and older backups may need them).

use pgrx::prelude::*;
use zeroize::Zeroizing;

use crate::catalog::keyring::{self, Missing};
use crate::catalog::privilege;
use crate::engine::access::{self, Privilege};
use crate::errors::{self, Code};
use crate::policy::seal::{self, MasterKey, OpenError};

/// The master keys this database recorded: (number, fingerprint), oldest first.
pub type Recorded = Vec<(u32, Vec<u8>)>;

/// Reads the recorded fingerprints; with `lock`, also keeps a rotation from starting until this
/// transaction ends (a secret being added is then sealed with the newest key).
pub fn recorded(client: &mut pgrx::spi::SpiClient<'_>, lock: bool) -> Recorded {
    let sql = if lock {
        "SELECT key_no, fingerprint FROM keypool.master_key ORDER BY key_no FOR KEY SHARE"
    } else {
        "SELECT key_no, fingerprint FROM keypool.master_key ORDER BY key_no"
    };
    let t = errors::spi(client.update(sql, None, &[]));
    t.map(|r| {
        (
            r.get::<i32>(1).ok().flatten().unwrap_or(0) as u32,
            r.get::<Vec<u8>>(2).ok().flatten().unwrap_or_default(),
        )
    })
    .collect()
}

fn setting_hint() -> String {
    format!(
        "The keyring file is set by pg_keypool.master_key_file ({}). Restore the keyring of the \
         cluster these secrets were sealed in (pg_basebackup copies it; copy it again after \
         keypool_rotate_master_key()). pg_keypool never makes a new key while sealed secrets exist.",
        keyring::path().display()
    )
}

/// Master key `number`, checked against the fingerprint this database recorded for it.
pub fn verified(recorded: &Recorded, number: u32) -> MasterKey {
    let fingerprints: Vec<&Vec<u8>> = recorded.iter().filter(|(n, _)| *n == number).map(|(_, f)| f).collect();
    if fingerprints.is_empty() {
        errors::error(
            Code::ERRCODE_DATA_CORRUPTED,
            format!("a secret is sealed with master key {number}, which this database never recorded"),
        )
        .hint("keypool.master_key and keypool.key do not belong together; restore them from the same dump.")
        .raise();
    }
    let key = match keyring::key(number) {
        Ok(k) => k,
        Err(Missing::File(path)) => errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_keypool's master key {number} is missing: the keyring file \"{}\" does not exist",
                path.display()
            ),
        )
        .detail(format!(
            "The provider secrets of this database are sealed with master key {number}."
        ))
        .hint(setting_hint())
        .raise(),
        Err(Missing::Key(path)) => errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_keypool's master key {number} is missing from the keyring file \"{}\"",
                path.display()
            ),
        )
        .detail(format!(
            "The provider secrets of this database are sealed with master key {number}."
        ))
        .hint(setting_hint())
        .raise(),
    };
    if !fingerprints
        .iter()
        .any(|f| f.as_slice() == key.fingerprint().as_slice())
    {
        errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_keypool's master key {number} in \"{}\" is not the key this database's secrets were sealed with",
                keyring::path().display()
            ),
        )
        .detail(format!(
            "The fingerprint of master key {number} differs from the one recorded in keypool.master_key."
        ))
        .hint(setting_hint())
        .raise();
    }
    key
}

/// Opens the sealed secret of key `key_id`.
pub fn open(recorded: &Recorded, key_id: i64, sealed: &[u8]) -> Zeroizing<String> {
    let Some(number) = seal::sealed_with(sealed) else {
        errors::error(
            Code::ERRCODE_DATA_CORRUPTED,
            format!("the sealed secret of key {key_id} is damaged"),
        )
        .raise()
    };
    let master = verified(recorded, number);
    match seal::open(&master, key_id, sealed) {
        Ok(s) => s,
        Err(OpenError::Malformed) | Err(OpenError::Forged) => errors::error(
            Code::ERRCODE_DATA_CORRUPTED,
            format!("the sealed secret of key {key_id} does not open with master key {number}"),
        )
        .detail("It was altered, or copied from another row.")
        .raise(),
    }
}

/// The master key to seal new secrets with: the newest one recorded, or, when this database has
/// sealed nothing yet, the keyring's newest (a new keyring when the cluster has none), recorded
/// now. Holds off rotations until the transaction ends.
pub fn sealing_key(client: &mut pgrx::spi::SpiClient<'_>) -> MasterKey {
    let rec = recorded(client, true);
    if let Some(&(newest, _)) = rec.last() {
        return verified(&rec, newest);
    }
    // Nothing recorded: only right while nothing is sealed either.
    let sealed = errors::spi(client.select(
        "SELECT EXISTS (SELECT 1 FROM keypool.key WHERE secret_sealed IS NOT NULL)",
        None,
        &[],
    ))
    .first()
    .get_one::<bool>()
    .ok()
    .flatten()
    .unwrap_or(false);
    if sealed {
        errors::error(
            Code::ERRCODE_DATA_CORRUPTED,
            "this database has sealed secrets but records no master key",
        )
        .hint("keypool.master_key and keypool.key do not belong together; restore them from the same dump.")
        .raise();
    }
    let key = keyring::newest_or_first();
    record(client, &key);
    let rec = recorded(client, true);
    verified(&rec, key.number)
}

fn record(client: &mut pgrx::spi::SpiClient<'_>, key: &MasterKey) {
    errors::spi(client.update(
        "INSERT INTO keypool.master_key (key_no, fingerprint) VALUES ($1, $2)",
        None,
        &[(key.number as i32).into(), key.fingerprint().to_vec().into()],
    ));
}

/// What a key's secret becomes in the table: sealed, the number of the master key, the keyed
/// digest that finds duplicates.
pub struct Sealed {
    pub sealed: Vec<u8>,
    pub master: i32,
    pub digest: Vec<u8>,
}

/// Seals a key's secret; `identity` is what finds the key again (its secret, or for a keyless
/// key its provider, base URL and model: see `identity`).
pub fn seal_secret(master: &MasterKey, key_id: i64, secret: &str, identity: &str) -> Sealed {
    Sealed {
        sealed: seal::seal(master, key_id, secret),
        master: master.number as i32,
        digest: seal::digest(master, identity),
    }
}

/// What identifies a key within its pool: its secret; for a keyless key (an empty secret: a
/// local server such as Ollama), its provider, base URL and model, so that two hosts are two
/// keys. No secret can look like a keyless identity: text never holds a NUL.
pub fn identity<'a>(secret: &'a str, provider: &str, base_url: &str, model: Option<&str>) -> std::borrow::Cow<'a, str> {
    if secret.is_empty() {
        format!("\0keyless\0{provider}\0{base_url}\0{}", model.unwrap_or("")).into()
    } else {
        secret.into()
    }
}

/// `keypool_rotate_master_key()`: adds a new master key to the keyring and reseals every secret
/// of this database with it. Returns the new key's number. Needs `admin` on every pool.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_rotate_master_key() -> i32 {
    let _path = privilege::pin_search_path();
    let grants = access::grants();
    access::require_every_pool(&grants, "rotate the master key", Privilege::Admin);
    privilege::spi_as_owner(grants.owner, |client| {
        // One rotation at a time, and no secret being added meanwhile.
        errors::spi(client.update("LOCK TABLE keypool.master_key IN EXCLUSIVE MODE", None, &[]));
        let mut rec = recorded(client, false);
        if rec.is_empty() {
            // Nothing sealed yet: start from the keyring's newest key like a first secret would.
            let first = keyring::newest_or_first();
            record(client, &first);
            rec = recorded(client, false);
        }
        for &(n, _) in &rec {
            verified(&rec, n);
        }
        let new = keyring::add();
        record(client, &new);
        #[allow(clippy::type_complexity)]
        let rows: Vec<(i64, Vec<u8>, (String, String, Option<String>))> = {
            let t = errors::spi(client.update(
                "SELECT id, secret_sealed, provider, base_url, model FROM keypool.key ORDER BY id FOR UPDATE",
                None,
                &[],
            ));
            t.map(|r| {
                (
                    r.get::<i64>(1).ok().flatten().unwrap_or(0),
                    r.get::<Vec<u8>>(2).ok().flatten().unwrap_or_default(),
                    (
                        r.get::<String>(3).ok().flatten().unwrap_or_default(),
                        r.get::<String>(4).ok().flatten().unwrap_or_default(),
                        r.get::<String>(5).ok().flatten(),
                    ),
                )
            })
            .collect()
        };
        let mut ids = Vec::with_capacity(rows.len());
        let mut sealed = Vec::with_capacity(rows.len());
        let mut digests = Vec::with_capacity(rows.len());
        for (id, old, (provider, base_url, model)) in &rows {
            let plain = open(&rec, *id, old);
            let s = seal_secret(
                &new,
                *id,
                &plain,
                &identity(&plain, provider, base_url, model.as_deref()),
            );
            ids.push(*id);
            sealed.push(s.sealed);
            digests.push(s.digest);
        }
        errors::spi(client.update(
            "UPDATE keypool.key k SET secret_sealed = v.s, sealed_with = $4, secret_hmac = v.d
               FROM unnest($1::bigint[], $2::bytea[], $3::bytea[]) AS v(id, s, d)
              WHERE k.id = v.id",
            None,
            &[ids.into(), sealed.into(), digests.into(), (new.number as i32).into()],
        ));
        // Keys none of this database's secrets need any more are forgotten here (the file keeps
        // them), and so are fingerprints that no longer match the keyring.
        errors::spi(client.update(
            "DELETE FROM keypool.master_key m
              WHERE m.key_no <> $1 AND NOT EXISTS (SELECT 1 FROM keypool.key k WHERE k.sealed_with = m.key_no)",
            None,
            &[(new.number as i32).into()],
        ));
        errors::spi(client.update(
            "DELETE FROM keypool.master_key m WHERE m.key_no = $1 AND m.fingerprint <> $2",
            None,
            &[(new.number as i32).into(), new.fingerprint().to_vec().into()],
        ));
        errors::spi(client.update(
            "INSERT INTO keypool.event (at, kind, reason) VALUES ($1, 'master_key_rotated', $2)",
            None,
            &[
                crate::state::clock::to_timestamptz(crate::state::clock::now_ms()).into(),
                format!("{} secret(s) resealed with master key {}", rows.len(), new.number).into(),
            ],
        ));
        new.number as i32
    })
}

/// Seals the plaintext secrets of an installation upgraded from 0.1.0 (called once by the
/// upgrade script, before the plaintext column is dropped) and gives every key a new label.
#[pg_extern(sql = false)]
fn keypool_seal_plaintext_secrets() -> i64 {
    let _path = privilege::pin_search_path();
    let owner = crate::catalog::config::extension_owner();
    privilege::spi_as_owner(owner, |client| {
        let rows: Vec<(i64, String)> = {
            let t = errors::spi(client.update(
                "SELECT id, secret FROM keypool.key WHERE secret_sealed IS NULL ORDER BY id FOR UPDATE",
                None,
                &[],
            ));
            t.map(|r| {
                (
                    r.get::<i64>(1).ok().flatten().unwrap_or(0),
                    r.get::<String>(2).ok().flatten().unwrap_or_default(),
                )
            })
            .collect()
        };
        if rows.is_empty() {
            return 0;
        }
        let master = sealing_key(client);
        for (id, secret) in &rows {
            let s = seal_secret(&master, *id, secret, secret);
            errors::spi(client.update(
                "UPDATE keypool.key SET secret_sealed = $2, sealed_with = $3, secret_hmac = $4, label = $5 WHERE id = $1",
                None,
                &[
                    (*id).into(),
                    s.sealed.into(),
                    s.master.into(),
                    s.digest.into(),
                    keypool_mask::mask(secret).into(),
                ],
            ));
        }
        rows.len() as i64
    })
}
