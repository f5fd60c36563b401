//! Secrets never leave the worker except towards their provider: everything the worker prints
//! or logs names a key by its id or by this masked label (the extension computes the same one).

/// A label that identifies a key to a human without revealing it: `sk-p…9xQa`. Short secrets
/// show less, and secrets of 8 characters or fewer show nothing but their length.
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

/// Replaces every occurrence of `secret` in `text` by its mask (provider error messages
/// sometimes quote the key they rejected).
pub fn scrub(text: &str, secret: &str) -> String {
    if secret.len() < 4 || !text.contains(secret) {
        return text.to_string();
    }
    text.replace(secret, &mask(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_masks_as_the_extension() {
        assert_eq!(mask("sk-proj-abcdefghijklmnop9xQa"), "sk-p…9xQa");
        assert_eq!(mask("AIzaSyD-1234567890"), "AIza…7890");
        assert_eq!(mask("short-key-12"), "sh…12");
        assert_eq!(mask("tiny"), "…(4 chars)");
    }

    #[test]
    fn scrub_hides_a_quoted_key() {
        let s = scrub(
            "Incorrect API key provided: sk-proj-abcdefghijklmnop9xQa.",
            "sk-proj-abcdefghijklmnop9xQa",
        );
        assert_eq!(s, "Incorrect API key provided: sk-p…9xQa.");
    }
}
