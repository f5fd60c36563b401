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

use zeroize::Zeroizing;

use crate::catalog::keyring::{self, Missing};
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

pub fn record(client: &mut pgrx::spi::SpiClient<'_>, key: &MasterKey) {
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

/// This database's transport secret (keypool-transport): derived from the master key new
/// secrets are sealed with and the installation's id, so that it changes with a rotation and
/// differs between databases. Never stored.
pub fn transport_secret(client: &mut pgrx::spi::SpiClient<'_>) -> Zeroizing<[u8; 32]> {
    let master = sealing_key(client);
    let instance = errors::spi(client.select("SELECT id FROM keypool.instance", None, &[]))
        .first()
        .get_one::<i64>()
        .ok()
        .flatten()
        .unwrap_or(0);
    keypool_transport::secret_from_master(master.bytes(), instance)
}

/// A secret as a caller passed it: sealed for transport (`kps1.`, opened here for `context`), or
/// as it is. A sealed secret that does not open is refused without a word about it.
pub fn unsealed(client: &mut pgrx::spi::SpiClient<'_>, secret: &str, context: &[u8]) -> Zeroizing<String> {
    if !secret.starts_with(keypool_transport::PREFIX) {
        return Zeroizing::new(secret.to_string());
    }
    let key = transport_secret(client);
    match keypool_transport::open(&key, secret, context) {
        Ok(plain) => plain,
        Err(why) => errors::invalid(why)
            .hint("Seal it again with the database's current keypool_transport_key().")
            .raise(),
    }
}
