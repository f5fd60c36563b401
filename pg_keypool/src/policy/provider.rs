//! The providers a key can belong to, with their default base URL and the time zone in which
//! their daily quotas reset.

pub struct Provider {
    pub name: &'static str,
    pub default_base_url: Option<&'static str>,
    pub day_zone: &'static str,
    /// Serves without a key (a local or self-hosted server): `secret => NULL` is accepted.
    pub keyless: bool,
}

pub const PROVIDERS: &[Provider] = &[
    Provider {
        name: "openai",
        default_base_url: Some("https://api.openai.com/v1"),
        keyless: false,
        day_zone: "UTC",
    },
    Provider {
        name: "gemini",
        default_base_url: Some("https://generativelanguage.googleapis.com"),
        keyless: false,
        day_zone: "America/Los_Angeles",
    },
    Provider {
        name: "anthropic",
        default_base_url: Some("https://api.anthropic.com"),
        keyless: false,
        day_zone: "UTC",
    },
    Provider {
        name: "xai",
        default_base_url: Some("https://api.x.ai/v1"),
        keyless: false,
        day_zone: "UTC",
    },
    Provider {
        name: "ollama",
        default_base_url: Some("http://localhost:11434"),
        keyless: true,
        day_zone: "UTC",
    },
    Provider {
        name: "openai_compatible",
        default_base_url: None,
        keyless: true,
        day_zone: "UTC",
    },
    Provider {
        name: "http",
        default_base_url: None,
        keyless: false,
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
