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
/// sometimes quote the key they rejected, and APIs echo their query strings), in whatever
/// encoding it appears: as it is, percent-encoded (any case, any mix, `+` for a space), with
/// JSON escapes (`\u0041`, `\/`) or as HTML character references (`&#65;`, `&#x41;`).
pub fn scrub(text: &str, secret: &str) -> String {
    if secret.len() < 4 {
        return text.to_string();
    }
    let label = mask(secret);
    let (t, want) = (text.as_bytes(), secret.as_bytes());
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < t.len() {
        match matches_at(t, i, want) {
            Some(end) => {
                out.push_str(&text[copied..i]);
                out.push_str(&label);
                i = end;
                copied = end;
            }
            None => i += 1,
        }
    }
    if copied == 0 {
        return text.to_string();
    }
    out.push_str(&text[copied..]);
    out
}

/// Where a match of `want` starting at `t[i]` ends, if one does.
fn matches_at(t: &[u8], mut i: usize, want: &[u8]) -> Option<usize> {
    for &b in want {
        i = byte_at(t, i, b)?;
    }
    Some(i)
}

/// The end of one encoding of byte `b` at `t[i]`, if `t[i..]` starts with one.
fn byte_at(t: &[u8], i: usize, b: u8) -> Option<usize> {
    let c = *t.get(i)?;
    if c == b {
        return Some(i + 1);
    }
    let hex = |s: &[u8]| {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| u32::from_str_radix(s, 16).ok())
    };
    match c {
        b'%' if t.len() >= i + 3 && hex(&t[i + 1..i + 3]) == Some(b as u32) => Some(i + 3),
        b'+' if b == b' ' => Some(i + 1),
        b'\\' => match t.get(i + 1) {
            Some(b'u') if t.len() >= i + 6 && hex(&t[i + 2..i + 6]) == Some(b as u32) && b.is_ascii() => Some(i + 6),
            Some(&e) if e == b && matches!(b, b'/' | b'"' | b'\\') => Some(i + 2),
            _ => None,
        },
        b'&' if t.get(i + 1) == Some(&b'#') && b.is_ascii() => {
            let end = i + 2 + t[i + 2..].iter().take(8).position(|&x| x == b';')?;
            let digits = &t[i + 2..end];
            let value = match digits.first() {
                Some(b'x' | b'X') => hex(&digits[1..]),
                _ => std::str::from_utf8(digits).ok().and_then(|s| s.parse::<u32>().ok()),
            };
            (value == Some(b as u32)).then_some(end + 1)
        }
        _ => None,
    }
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
    fn scrub_hides_encoded_forms_of_the_key() {
        let secret = "sk-proj-ab/cd+ef gh9xQa";
        let label = mask(secret);
        for echoed in [
            "sk-proj-ab%2Fcd%2Bef%20gh9xQa",
            "sk-proj-ab%2fcd%2bef+gh9xQa",
            "%73%6B%2D%70%72%6F%6A%2D%61%62%2F%63%64%2B%65%66%20%67%68%39%78%51%61",
            r"sk-proj-ab\/cd+ef gh9xQa",
            r"\u0073k-proj-ab\u002fcd+ef\u0020gh9xQa",
            "sk-proj-ab&#47;cd&#x2B;ef&#32;gh9xQa",
        ] {
            let text = format!("api_key={echoed}&q=1");
            let s = scrub(&text, secret);
            assert_eq!(s, format!("api_key={label}&q=1"), "{echoed}");
        }
        assert_eq!(scrub("nothing here", secret), "nothing here");
        assert_eq!(scrub("sk-proj-ab%2", secret), "sk-proj-ab%2");
        // Multibyte text around it is kept.
        assert_eq!(scrub("ü sk-proj-ab/cd+ef gh9xQa ü", secret), format!("ü {label} ü"));
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
