//! Functions over the sealed secrets of this database: rotating the master key (`keypool_rotate_master_key`)
//! and sealing the plaintext secrets of an installation upgraded from 0.1.0. How secrets are
//! sealed and opened is in catalog/vault.rs.

use pgrx::prelude::*;

use crate::catalog::grants::Privilege;
use crate::catalog::keyring;
use crate::catalog::privilege;
use crate::catalog::vault::{identity, open, record, recorded, seal_secret, sealing_key, transport_secret, verified};
use crate::engine::access;
use crate::errors;

/// `keypool_transport_key()`: this database's public transport key (X25519, 32 bytes). A
/// client seals a secret to it (keypool-transport, `kps1.`) before passing it to
/// `keypool_add_key` or `keypool_rotate_secret`, so that no statement log holds the secret. It
/// is public, and changes when the master key is rotated.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_transport_key() -> Vec<u8> {
    let _path = privilege::pin_search_path();
    let grants = access::grants();
    privilege::spi_as_owner(grants.owner, |client| {
        keypool_transport::public_key(&transport_secret(client)).to_vec()
    })
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
    let owner = crate::catalog::privilege::extension_owner();
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
