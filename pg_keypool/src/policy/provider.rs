//! The providers a key can belong to, with their default base URL and the time zone in which
//! their daily quotas reset.

pub struct Provider {
    pub name: &'static str,
    pub default_base_url: Option<&'static str>,
    pub day_zone: &'static str,
    /// Serves without a key (a local or self-hosted server): `secret => NULL` is accepted.
    pub keyless: bool,
    /// Rejects keys it did not issue, so that a check with it says whether a key is real: only
    /// such providers take users' own keys.
    pub checks_keys: bool,
}

pub const PROVIDERS: &[Provider] = &[
    Provider {
        name: "openai",
        default_base_url: Some("https://api.openai.com/v1"),
        keyless: false,
        checks_keys: true,
        day_zone: "UTC",
    },
    Provider {
        name: "gemini",
        default_base_url: Some("https://generativelanguage.googleapis.com"),
        keyless: false,
        checks_keys: true,
        day_zone: "America/Los_Angeles",
    },
    Provider {
        name: "anthropic",
        default_base_url: Some("https://api.anthropic.com"),
        keyless: false,
        checks_keys: true,
        day_zone: "UTC",
    },
    Provider {
        name: "xai",
        default_base_url: Some("https://api.x.ai/v1"),
        keyless: false,
        checks_keys: true,
        day_zone: "UTC",
    },
    Provider {
        name: "ollama",
        default_base_url: Some("http://localhost:11434"),
        keyless: true,
        checks_keys: false,
        day_zone: "UTC",
    },
    Provider {
        name: "openai_compatible",
        default_base_url: None,
        keyless: true,
        checks_keys: false,
        day_zone: "UTC",
    },
    Provider {
        name: "http",
        default_base_url: None,
        keyless: false,
        checks_keys: false,
        day_zone: "UTC",
    },
];

pub fn find(name: &str) -> Option<&'static Provider> {
    PROVIDERS.iter().find(|p| p.name == name)
}

pub fn names() -> String {
    PROVIDERS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// The providers that serve without a key.
pub fn keyless_names() -> String {
    PROVIDERS
        .iter()
        .filter(|p| p.keyless)
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The providers that take users' own keys (they reject keys they did not issue).
pub fn checked_names() -> String {
    PROVIDERS
        .iter()
        .filter(|p| p.checks_keys)
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_has_a_valid_day_zone_and_a_unique_name() {
        for p in PROVIDERS {
            assert!(
                p.day_zone.parse::<chrono_tz::Tz>().is_ok(),
                "{}: {}",
                p.name,
                p.day_zone
            );
            assert_eq!(PROVIDERS.iter().filter(|q| q.name == p.name).count(), 1, "{}", p.name);
        }
        // Gemini's daily quotas reset at midnight Pacific time (seed 000).
        assert_eq!(find("gemini").map(|p| p.day_zone), Some("America/Los_Angeles"));
        assert!(find("OpenAI").is_none(), "names are exact");
        assert_eq!(keyless_names(), "ollama, openai_compatible");
        assert_eq!(checked_names(), "openai, gemini, anthropic, xai");
        for p in PROVIDERS {
            assert!(
                !(p.keyless && p.checks_keys),
                "{}: a keyless server checks no key",
                p.name
            );
        }
    }
}
