//! Sealing provider secrets: AEAD encryption under a master key, and the keyed digest that
//! recognises a secret already in a pool. Pure: no PostgreSQL in here.
//!
//! A sealed secret is `[version 1][master key number, u32 BE][nonce, 24 bytes][ciphertext+tag]`,
//! XChaCha20-Poly1305 (RustCrypto) with a random nonce, under a key derived from the master key
//! (HKDF-SHA256), with the key's row id as associated data: a sealed secret moved to another
//! row does not open. The digest is HMAC-SHA256 under another derived key, so that the
//! duplicate check reveals nothing to someone who can read the table but not the keyring.

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

const VERSION: u8 = 1;
const NONCE: usize = 24;
const HEADER: usize = 1 + 4 + NONCE;

/// One master key of the keyring: its number and its 32 bytes (wiped when dropped).
#[derive(Clone)]
pub struct MasterKey {
    pub number: u32,
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.number)
    }
}

impl MasterKey {
    pub fn new(number: u32, bytes: [u8; 32]) -> Self {
        let mut b = bytes;
        let key = MasterKey {
            number,
            bytes: Zeroizing::new(b),
        };
        b.zeroize();
        key
    }

    /// A new random key.
    pub fn generate(number: u32) -> Self {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        MasterKey::new(number, b)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    fn derive(&self, purpose: &[u8]) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(Some(b"pg_keypool"), self.bytes.as_slice());
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(purpose, out.as_mut_slice());
        out
    }

    /// Identifies the key without revealing it (stored per database, checked before use).
    pub fn fingerprint(&self) -> [u8; 32] {
        *self.derive(b"master key fingerprint v1")
    }
}

/// Why a sealed secret did not open.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Not a sealed secret of a version this library knows.
    Malformed,
    /// The key is right but the secret does not authenticate (altered, or moved to another row).
    Forged,
}

fn aad(key_id: i64) -> Vec<u8> {
    let mut a = b"pg_keypool key secret ".to_vec();
    a.extend_from_slice(&key_id.to_be_bytes());
    a
}

fn cipher(master: &MasterKey) -> XChaCha20Poly1305 {
    let k = master.derive(b"secret sealing v1");
    XChaCha20Poly1305::new(k.as_slice().into())
}

/// Seals `secret` of key `key_id` under `master`.
pub fn seal(master: &MasterKey, key_id: i64, secret: &str) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = cipher(master)
        .encrypt(
            &nonce,
            Payload {
                msg: secret.as_bytes(),
                aad: &aad(key_id),
            },
        )
        .unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + sealed.len());
    out.push(VERSION);
    out.extend_from_slice(&master.number.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// The number of the master key a sealed secret needs.
pub fn sealed_with(sealed: &[u8]) -> Option<u32> {
    if sealed.len() < HEADER + 16 || sealed[0] != VERSION {
        return None;
    }
    Some(u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]))
}

/// Opens the sealed secret of key `key_id` with `master` (which must be the key it names).
pub fn open(master: &MasterKey, key_id: i64, sealed: &[u8]) -> Result<Zeroizing<String>, OpenError> {
    if sealed_with(sealed) != Some(master.number) {
        return Err(OpenError::Malformed);
    }
    let nonce = XNonce::from_slice(&sealed[5..HEADER]);
    let plain = cipher(master)
        .decrypt(
            nonce,
            Payload {
                msg: &sealed[HEADER..],
                aad: &aad(key_id),
            },
        )
        .map_err(|_| OpenError::Forged)?;
    let plain = Zeroizing::new(plain);
    match std::str::from_utf8(&plain) {
        Ok(s) => Ok(Zeroizing::new(s.to_string())),
        Err(_) => Err(OpenError::Forged),
    }
}

/// The keyed digest of a secret (HMAC-SHA256 under a key derived from `master`): equal for
/// equal secrets under the same master key, meaningless without it.
pub fn digest(master: &MasterKey, secret: &str) -> Vec<u8> {
    let k = master.derive(b"secret digest v1");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(k.as_slice()).expect("HMAC takes any key length");
    mac.update(secret.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32, fill: u8) -> MasterKey {
        MasterKey::new(n, [fill; 32])
    }

    #[test]
    fn a_sealed_secret_opens_with_its_key_and_row_only() {
        let k = key(1, 7);
        let sealed = seal(&k, 42, "sk-proj-abcdefghijklmnop9xQa");
        assert_eq!(sealed_with(&sealed), Some(1));
        assert_eq!(open(&k, 42, &sealed).unwrap().as_str(), "sk-proj-abcdefghijklmnop9xQa");
        // Another row's id as associated data: refused.
        assert_eq!(open(&k, 43, &sealed), Err(OpenError::Forged));
        // Another key with the same number: refused.
        assert_eq!(open(&key(1, 8), 42, &sealed), Err(OpenError::Forged));
        // A key of another number is not even tried.
        assert_eq!(open(&key(2, 7), 42, &sealed), Err(OpenError::Malformed));
    }

    #[test]
    fn sealing_hides_the_secret_and_never_repeats() {
        let k = key(3, 1);
        let secret = "AIzaSyD-1234567890abcdef";
        let a = seal(&k, 1, secret);
        let b = seal(&k, 1, secret);
        assert_ne!(a, b, "random nonces");
        assert!(!a.windows(8).any(|w| secret.as_bytes().windows(8).any(|s| s == w)));
    }

    #[test]
    fn any_change_to_a_sealed_secret_is_detected() {
        let k = key(1, 9);
        let sealed = seal(&k, 5, "xai-0123456789abcdefghij");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(open(&k, 5, &bad).is_err(), "byte {i}");
        }
        assert!(open(&k, 5, &sealed[..10]).is_err());
        assert!(open(&k, 5, &[]).is_err());
    }

    #[test]
    fn digests_match_for_equal_secrets_under_one_key() {
        let k = key(1, 2);
        assert_eq!(digest(&k, "abc"), digest(&k, "abc"));
        assert_ne!(digest(&k, "abc"), digest(&k, "abd"));
        assert_ne!(digest(&k, "abc"), digest(&key(1, 3), "abc"));
        // Not the plain SHA-256 of the secret.
        use sha2::Digest;
        assert_ne!(digest(&k, "abc"), Sha256::digest(b"abc").to_vec());
    }

    #[test]
    fn fingerprints_tell_keys_apart() {
        assert_eq!(key(1, 1).fingerprint(), key(1, 1).fingerprint());
        assert_ne!(key(1, 1).fingerprint(), key(1, 2).fingerprint());
        assert_ne!(key(1, 1).fingerprint().as_slice(), key(1, 1).bytes().as_slice());
    }
}
