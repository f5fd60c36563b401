//! Secrets: the masked label shown everywhere a key is named, and the digest that makes adding
//! the same secret twice idempotent. The secret itself only ever leaves the extension in
//! `keypool_reserve`'s result.

use sha2::{Digest, Sha256};

/// A label that identifies a key to a human without revealing it: `sk-p…9xQa`.
/// Short secrets show less, and secrets of 8 characters or fewer show nothing but their length.
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len();
    let (head, tail) = match n {
        0..=8 => return format!("…({n} chars)"),
        9..=15 => (2, 2),
        _ => (4, 4),
    };
    let first: String = chars[..head].iter().collect();
    let last: String = chars[n - tail..].iter().collect();
    format!("{first}…{last}")
}

pub fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_never_reveal_more_than_eight_characters() {
        assert_eq!(mask("sk-proj-abcdefghijklmnop9xQa"), "sk-p…9xQa");
        assert_eq!(mask("AIzaSyD-1234567890"), "AIza…7890");
        assert_eq!(mask("short-key-12"), "sh…12");
        assert_eq!(mask("tiny"), "…(4 chars)");
        assert_eq!(mask("ünïcödé-sécrét-këy"), "ünïc…-këy");
    }

    #[test]
    fn digest_is_stable() {
        assert_eq!(digest("a"), digest("a"));
        assert_ne!(digest("a"), digest("b"));
        assert_eq!(digest("a").len(), 32);
    }
}
