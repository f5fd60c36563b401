//! What a provider says of a key's own rate limits in its answers' headers: OpenAI and xAI
//! (`x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` as a duration such as `6m0s`,
//! and the same for tokens), Anthropic (`anthropic-ratelimit-requests-remaining`,
//! `anthropic-ratelimit-requests-reset` as an RFC 3339 time, and the same for tokens). The
//! worker passes them to `keypool_settle`, which holds the key's scope to the provider's figure
//! when it reports less room than the extension counts.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// The provider's remaining requests or tokens, and when they reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Remaining {
    pub remaining: i64,
    /// Milliseconds until the figure resets.
    pub reset_ms: i64,
}

/// What one answer reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub requests: Option<Remaining>,
    pub tokens: Option<Remaining>,
}

impl Counters {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

/// Longest reset a provider's figure is believed for (a day).
const MAX_RESET_MS: i64 = 86_400_000;

/// The counters in an answer's headers, for the providers that send them.
pub fn read(provider: &str, headers: &HeaderMap, now: SystemTime) -> Counters {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let number = |name: &str| text(name).and_then(|v| v.parse::<i64>().ok()).filter(|n| *n >= 0);
    match provider {
        "openai" | "xai" | "openai_compatible" => {
            let pair = |what: &str| {
                Some(Remaining {
                    remaining: number(&format!("x-ratelimit-remaining-{what}"))?,
                    reset_ms: text(&format!("x-ratelimit-reset-{what}")).and_then(go_duration_ms)?,
                })
            };
            Counters {
                requests: pair("requests"),
                tokens: pair("tokens"),
            }
        }
        "anthropic" => {
            let pair = |what: &str| {
                let at = text(&format!("anthropic-ratelimit-{what}-reset"))
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())?;
                let at_ms = at.timestamp_millis();
                let now_ms = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_millis() as i64;
                Some(Remaining {
                    remaining: number(&format!("anthropic-ratelimit-{what}-remaining"))?,
                    reset_ms: (at_ms - now_ms).clamp(0, MAX_RESET_MS),
                })
            };
            Counters {
                requests: pair("requests"),
                tokens: pair("tokens"),
            }
        }
        _ => Counters::default(),
    }
}

/// A Go-style duration (`1s`, `6m0s`, `20ms`, `1h2m3.5s`) in milliseconds, capped at a day.
fn go_duration_ms(text: &str) -> Option<i64> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    Some((total.ceil() as i64).clamp(0, MAX_RESET_MS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration_ms("1s"), Some(1_000));
        assert_eq!(go_duration_ms("6m0s"), Some(360_000));
        assert_eq!(go_duration_ms("20ms"), Some(20));
        assert_eq!(go_duration_ms("1h2m3.5s"), Some(3_723_500));
        assert_eq!(go_duration_ms("17.2s"), Some(17_200));
        assert_eq!(go_duration_ms("forever"), None);
        assert_eq!(go_duration_ms(""), None);
        assert_eq!(go_duration_ms("999h"), Some(MAX_RESET_MS));
    }

    #[test]
    fn openai_and_anthropic_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "20s"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-tokens", "6ms"),
        ]);
        let c = read("openai", &h, now);
        assert_eq!(
            c.requests,
            Some(Remaining {
                remaining: 0,
                reset_ms: 20_000
            })
        );
        assert_eq!(
            c.tokens,
            Some(Remaining {
                remaining: 149_984,
                reset_ms: 6
            })
        );
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "3"),
            ("anthropic-ratelimit-requests-reset", "2027-01-15T08:00:30Z"),
        ]);
        let now = chrono::DateTime::parse_from_rfc3339("2027-01-15T08:00:00Z").expect("time");
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(now.timestamp_millis() as u64);
        let c = read("anthropic", &h, now);
        assert_eq!(
            c.requests,
            Some(Remaining {
                remaining: 3,
                reset_ms: 30_000
            })
        );
        assert_eq!(c.tokens, None);
        // Gemini sends none; nonsense is ignored.
        assert!(read("gemini", &h, now).is_empty());
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-reset-requests", "1s"),
        ]);
        assert!(read("openai", &h, now).is_empty());
    }
}
