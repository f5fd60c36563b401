//! How pg_keypool and keypool-worker show a provider key to a human: the provider's fixed
//! prefix (`sk-proj-`, `sk-ant-api03-`, `AIza`, `xai-`, ...), which every key of that kind
//! shares and which therefore reveals nothing, then an ellipsis and at most four of the key's
//! last characters. Short keys show fewer: never more than a quarter of what follows the
//! prefix. The extension stores this label; the worker prints it in logs and command output.

/// Fixed prefixes of provider keys, longest first so that the most specific one wins.
const PREFIXES: &[&str] = &[
    "sk-ant-admin01-",
    "sk-ant-api03-",
    "sk-svcacct-",
    "sk-or-v1-",
    "sk-admin-",
    "sk-proj-",
    "sk-None-",
    "sk-ant-",
    "pplx-",
    "AIza",
    "xai-",
    "gsk_",
    "hf_",
    "r8_",
    "sk-",
];

/// Most characters of a key shown after its prefix.
pub const MAX_SHOWN: usize = 4;

/// The provider prefix `secret` starts with, if any.
pub fn prefix_of(secret: &str) -> &'static str {
    PREFIXES
        .iter()
        .find(|p| secret.starts_with(**p) && secret.len() > p.len())
        .copied()
        .unwrap_or("")
}

/// A label that identifies a key to a human without revealing it: `sk-proj-…9xQa`.
pub fn mask(secret: &str) -> String {
    let prefix = prefix_of(secret);
    let rest: Vec<char> = secret[prefix.len()..].chars().collect();
    let shown = (rest.len() / 4).min(MAX_SHOWN);
    if shown == 0 {
        return format!("{prefix}…({} chars)", rest.len());
    }
    let tail: String = rest[rest.len() - shown..].iter().collect();
    format!("{prefix}…{tail}")
}

/// Replaces every occurrence of `secret` in `text` by its label (provider error messages
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
    fn labels_show_the_provider_prefix_and_at_most_four_more_characters() {
        assert_eq!(mask("sk-proj-abcdefghijklmnop9xQa"), "sk-proj-…9xQa");
        assert_eq!(
            mask("sk-ant-api03-abcdefghijklmnopqrstuvwxyzWXYZ"),
            "sk-ant-api03-…WXYZ"
        );
        assert_eq!(mask("AIzaSyD-1234567890abcdef"), "AIza…cdef");
        assert_eq!(mask("xai-0123456789abcdefghij"), "xai-…ghij");
        assert_eq!(mask("0123456789abcdef0123456789abcdef"), "…cdef");
    }

    #[test]
    fn short_keys_show_at_most_a_quarter_of_what_follows_the_prefix() {
        // 16 characters (the example of issue 11): 4, not 8.
        assert_eq!(mask("abcdefghijklmnop"), "…mnop");
        assert_eq!(mask("short-key-12"), "…-12");
        assert_eq!(mask("sk-abcdefgh"), "sk-…gh");
        assert_eq!(mask("tiny"), "…y");
        assert_eq!(mask("abc"), "…(3 chars)");
        assert_eq!(mask("sk-ab"), "sk-…(2 chars)");
        assert_eq!(mask(""), "…(0 chars)");
        // A bare prefix is not taken as one.
        assert_eq!(mask("AIza"), "…a");
    }

    #[test]
    fn no_label_shows_more_than_the_prefix_and_four_characters() {
        for len in 0..80 {
            for p in PREFIXES.iter().chain([&""]) {
                let secret: String = format!("{p}{}", "x".repeat(len));
                let label = mask(&secret);
                let (prefix, shown) = label.split_once('…').unwrap_or(("", ""));
                assert!(secret.starts_with(prefix), "{secret} -> {label}");
                if !shown.starts_with('(') {
                    let rest = secret.len() - prefix.len();
                    assert!(shown.chars().count() <= MAX_SHOWN, "{secret} -> {label}");
                    assert!(shown.chars().count() * 4 <= rest, "{secret} -> {label}");
                }
            }
        }
    }

    #[test]
    fn multibyte_secrets_are_cut_on_characters() {
        assert_eq!(mask("ünïcödé-sécrét-këy"), "…-këy");
    }

    #[test]
    fn scrub_hides_a_quoted_key() {
        let s = scrub(
            "Incorrect API key provided: sk-proj-abcdefghijklmnop9xQa.",
            "sk-proj-abcdefghijklmnop9xQa",
        );
        assert_eq!(s, "Incorrect API key provided: sk-proj-…9xQa.");
    }
}
