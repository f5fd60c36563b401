//! Provider secrets sealed on their way into pg_keypool.
//!
//! A secret passed to `keypool_add_key` or `keypool_rotate_secret` as a bind parameter reaches
//! the server log whenever statements are logged with their parameters (`log_statement = 'all'`,
//! `log_min_duration_statement`, unless `log_parameter_max_length` is 0 for the role, which
//! only a superuser may set). So keypool-worker seals each secret to the database first: an
//! X25519 key agreement with the database's transport key (`keypool_transport_key()`, derived
//! from the keyring's newest master key, which never leaves the server), HKDF-SHA256, and
//! XChaCha20-Poly1305, with the call it is meant for as associated data (`add` to a pool for an
//! owner, `rotate` of a key id): a sealed secret copied from a log opens nowhere else, and only
//! inside that database. The extension opens secrets that start with [`PREFIX`]; others are
//! taken as they are.
//!
//! The sealed form is `kps1.` followed by base64url (no padding) of the sender's ephemeral
//! public key (32 bytes), the nonce (24) and the ciphertext with its tag.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// What every sealed secret starts with.
pub const PREFIX: &str = "kps1.";

const INFO: &[u8] = b"pg_keypool transport v1";
const KEY_INFO: &[u8] = b"pg_keypool transport key v1";

/// The purpose a secret is sealed for: it opens for that call only.
pub fn context_add(pool: &str, owner: Option<&str>) -> Vec<u8> {
    let mut c = b"add\0".to_vec();
    c.extend_from_slice(pool.as_bytes());
    c.push(0);
    c.extend_from_slice(owner.unwrap_or("").as_bytes());
    c
}

pub fn context_rotate(key_id: i64) -> Vec<u8> {
    format!("rotate\0{key_id}").into_bytes()
}

/// The database's transport secret, derived from a master key and the installation's id.
pub fn secret_from_master(master: &[u8], instance: i64) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(&instance.to_le_bytes()), master);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes are always within HKDF-SHA256's output limit.
    let _ = hk.expand(KEY_INFO, out.as_mut());
    out
}

/// The public key that goes with a transport secret.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

fn cipher(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> XChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut key = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(INFO, key.as_mut());
    XChaCha20Poly1305::new(key.as_ref().into())
}

/// Seals `secret` to the database whose transport public key is `recipient`, for `context`.
/// `random` supplies 56 random bytes (ephemeral key and nonce).
pub fn seal(recipient: &[u8; 32], secret: &str, context: &[u8], random: [u8; 56]) -> String {
    let mut eph = [0u8; 32];
    eph.copy_from_slice(&random[..32]);
    let eph = StaticSecret::from(eph);
    let eph_public = PublicKey::from(&eph).to_bytes();
    let shared = Zeroizing::new(eph.diffie_hellman(&PublicKey::from(*recipient)).to_bytes());
    let nonce: [u8; 24] = random[32..].try_into().unwrap_or([0u8; 24]);
    let sealed = cipher(&shared, &eph_public, recipient)
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: secret.as_bytes(),
                aad: context,
            },
        )
        .unwrap_or_default();
    let mut raw = Vec::with_capacity(56 + sealed.len());
    raw.extend_from_slice(&eph_public);
    raw.extend_from_slice(&nonce);
    raw.extend_from_slice(&sealed);
    format!("{PREFIX}{}", base64url(&raw))
}

/// Opens a sealed secret with the database's transport secret, for `context`. The error says
/// nothing about the secret.
pub fn open(transport_secret: &[u8; 32], sealed: &str, context: &[u8]) -> Result<Zeroizing<String>, &'static str> {
    const REFUSED: &str = "the sealed secret does not open here (sealed for another database, call or key)";
    let body = sealed.strip_prefix(PREFIX).ok_or(REFUSED)?;
    let raw = Zeroizing::new(from_base64url(body).ok_or(REFUSED)?);
    if raw.len() < 32 + 24 + 16 {
        return Err(REFUSED);
    }
    let eph: [u8; 32] = raw[..32].try_into().map_err(|_| REFUSED)?;
    let recipient = public_key(transport_secret);
    let shared = Zeroizing::new(
        StaticSecret::from(*transport_secret)
            .diffie_hellman(&PublicKey::from(eph))
            .to_bytes(),
    );
    let plain = cipher(&shared, &eph, &recipient)
        .decrypt(
            XNonce::from_slice(&raw[32..56]),
            Payload {
                msg: &raw[56..],
                aad: context,
            },
        )
        .map_err(|_| REFUSED)?;
    String::from_utf8(plain).map(Zeroizing::new).map_err(|_| REFUSED)
}

fn base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn from_base64url(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(seed: u8) -> [u8; 56] {
        let mut r = [0u8; 56];
        for (i, b) in r.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add((i as u8).wrapping_mul(7));
        }
        r
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_database_and_call() {
        let db = secret_from_master(b"master key material of 32 bytes!", 42);
        let public = public_key(&db);
        let ctx = context_add("chat", Some("alice"));
        let sealed = seal(&public, "sk-proj-very-secret-0001", &ctx, random(1));
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.contains("very-secret"));
        assert_eq!(open(&db, &sealed, &ctx).unwrap().as_str(), "sk-proj-very-secret-0001");
        // Another call, another owner, another database, a changed byte: nothing.
        assert!(open(&db, &sealed, &context_add("chat", Some("mallory"))).is_err());
        assert!(open(&db, &sealed, &context_add("other", Some("alice"))).is_err());
        assert!(open(&db, &sealed, &context_rotate(1)).is_err());
        let other = secret_from_master(b"master key material of 32 bytes!", 43);
        assert!(open(&other, &sealed, &ctx).is_err());
        let mut bytes = sealed.clone().into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(open(&db, &String::from_utf8(bytes).unwrap(), &ctx).is_err());
        assert!(open(&db, "kps1.", &ctx).is_err());
        assert!(open(&db, "kps1.!!!", &ctx).is_err());
        // Each sealing is different.
        assert_ne!(seal(&public, "x", &ctx, random(2)), seal(&public, "x", &ctx, random(3)));
    }

    #[test]
    fn base64url_round_trips() {
        for n in 0..70u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(from_base64url(&base64url(&data)).unwrap(), data);
        }
    }
}
