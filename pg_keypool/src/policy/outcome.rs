//! What a provider's answer means for the key and scope that served it.
//!
//! `keypool_settle` receives the HTTP status (0 when no answer came: timeout or connection
//! failure) and, where the worker could read one, the provider's error code (OpenAI `error.code`
//! or `error.type`, Gemini `error.status` / `details[].reason` / a `QuotaFailure` quota id,
//! Anthropic `error.type`). This module turns them into one [`Outcome`]; `settle.rs` applies it.
//! The rules follow `shared/notes/provider-facts.md`.

/// The class of a provider call's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the call worked.
    Success,
    /// 429 and similar: the scope is over a per-minute limit; cool it until `retry_after`.
    RateLimited,
    /// The scope's daily quota is used up at the provider; cool it until its next daily reset.
    DailyQuota,
    /// 401/403, Gemini API_KEY_INVALID: the key is bad; disable it.
    KeyInvalid,
    /// Billing (insufficient_quota, 402, free tier unavailable): disable the whole scope.
    Billing,
    /// 5xx, 529 overloaded, timeouts: provider trouble; counts towards the key's circuit breaker.
    ServerError,
    /// 400/404/413/422: the request was wrong; no penalty for the key.
    CallerError,
    /// Anything else (e.g. 403 unsupported region): recorded, no penalty.
    Other,
}

impl Outcome {
    /// The name `keypool_settle` returns and the history records.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::RateLimited => "rate_limited",
            Outcome::DailyQuota => "daily_quota",
            Outcome::KeyInvalid => "key_invalid",
            Outcome::Billing => "billing",
            Outcome::ServerError => "server_error",
            Outcome::CallerError => "caller_error",
            Outcome::Other => "other",
        }
    }

    /// Whether this call counts as an error in the statistics.
    pub fn is_error(self) -> bool {
        self != Outcome::Success
    }
}

const BILLING_CODES: &[&str] = &[
    "insufficient_quota",
    "billing_hard_limit_reached",
    "billing_not_active",
    "credit_balance_exhausted",
    "credit_balance_too_low",
    "payment_required",
    "failed_precondition",
];

const KEY_INVALID_CODES: &[&str] = &[
    "api_key_invalid",
    "invalid_api_key",
    "incorrect_api_key",
    "authentication_error",
    "permission_error",
    "permission_denied",
    "unauthenticated",
    "account_deactivated",
];

/// Codes that come with a 403 but say nothing bad about the key itself.
const NOT_THE_KEYS_FAULT: &[&str] = &["unsupported_country_region_territory", "unsupported_region"];

const DAILY_MARKERS: &[&str] = &["perday", "per_day", "daily", "requests_per_day", "tokens_per_day"];

/// Error codes of calls to a path the caller chose (the worker's `/v1/proxy` route) start with
/// this: such an answer may cool a scope for a bounded time (429, capped by
/// `pg_keypool.max_cooldown`) or trip a breaker (5xx), never disable a key or an account, nor
/// take it out for the rest of the day (the 401, 403 or quota answer may well be the path's,
/// not the key's).
pub const CALLER_PATH: &str = "proxy:";

/// The worker checked the key with its provider after this answer, and the provider accepted
/// the key: a 401 or 403 was about the request (its model, its shape), not the key. No penalty.
pub const KEY_CHECKED: &str = "checked:";

/// Error codes of answers to requests whose shape the caller chose (chat, embeddings) start with
/// this: an answer that would disable the key is not settled (`keypool_settle` returns
/// [`NEEDS_KEY_CHECK`] and the reservation stays open) until the worker has asked the provider
/// about the key itself and settles again, with the plain code (the provider rejected the key:
/// it is disabled) or with [`KEY_CHECKED`] (the provider accepted it). Any other outcome is
/// settled at once, as without the prefix.
pub const KEY_UNCHECKED: &str = "unchecked:";

/// What `keypool_settle` returns for an unchecked answer that would disable the key.
pub const NEEDS_KEY_CHECK: &str = "key_unchecked";

/// `code` without `prefix` (compared without case), if it starts with it.
pub fn strip_prefix<'a>(code: &'a str, prefix: &str) -> Option<&'a str> {
    let head = code.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &code[prefix.len()..])
}

/// `code` without any of the worker's prefixes.
pub fn bare(code: &str) -> &str {
    let mut code = code;
    while let Some(rest) = [KEY_UNCHECKED, KEY_CHECKED, CALLER_PATH, CALLER_MODEL]
        .iter()
        .find_map(|p| strip_prefix(code, p))
    {
        code = rest;
    }
    code
}

/// Whether the caller chose what made the provider answer so (the path: `proxy:`, or the model:
/// `model:`): such an answer may cool an account only briefly, however long the provider says.
pub fn caller_shaped(code: &str) -> bool {
    let mut code = code;
    loop {
        if strip_prefix(code, CALLER_PATH).is_some() || strip_prefix(code, CALLER_MODEL).is_some() {
            return true;
        }
        match [KEY_UNCHECKED, KEY_CHECKED].iter().find_map(|p| strip_prefix(code, p)) {
            Some(rest) => code = rest,
            None => return false,
        }
    }
}

/// Whether settling `status` with `error_code` must wait for a check of the key: the caller
/// chose the request's shape and the answer would disable the key.
pub fn needs_key_check(status: i32, error_code: Option<&str>) -> bool {
    error_code
        .and_then(|c| strip_prefix(c, KEY_UNCHECKED))
        .is_some_and(|rest| classify(status, Some(rest).filter(|c| !c.is_empty())) == Outcome::KeyInvalid)
}

/// Error codes of answers to requests whose model the caller chose (the key names none) start
/// with this: a per-day quota of that model is no verdict on the key's account for the day, so
/// the account only cools (for at most `pg_keypool.max_cooldown`), as for a per-minute limit;
/// likewise Gemini's FAILED_PRECONDITION (a model the project may not use).
pub const CALLER_MODEL: &str = "model:";

/// Classifies a provider answer. `status` is the HTTP status, or 0 when no answer came.
pub fn classify(status: i32, error_code: Option<&str>) -> Outcome {
    let code = error_code.map(|c| c.trim().to_ascii_lowercase()).unwrap_or_default();
    if let Some(rest) = code.strip_prefix(KEY_UNCHECKED) {
        return match classify(status, Some(rest).filter(|c| !c.is_empty())) {
            // Gemini's FAILED_PRECONDITION also answers requests that ask for what the model
            // or project does not allow: about the request as much as the account, so the
            // account only cools (a billing code of the account itself still disables it).
            Outcome::Billing if bare(rest) == "failed_precondition" => Outcome::RateLimited,
            outcome => outcome,
        };
    }
    if let Some(rest) = code.strip_prefix(KEY_CHECKED) {
        return match classify(status, Some(rest).filter(|c| !c.is_empty())) {
            Outcome::KeyInvalid => Outcome::Other,
            outcome => outcome,
        };
    }
    if let Some(rest) = code.strip_prefix(CALLER_PATH) {
        return match classify(status, Some(rest).filter(|c| !c.is_empty())) {
            Outcome::KeyInvalid | Outcome::Billing => Outcome::Other,
            Outcome::DailyQuota => Outcome::RateLimited,
            outcome => outcome,
        };
    }
    if let Some(rest) = code.strip_prefix(CALLER_MODEL) {
        return match classify(status, Some(rest).filter(|c| !c.is_empty())) {
            Outcome::DailyQuota => Outcome::RateLimited,
            Outcome::Billing if rest == "failed_precondition" => Outcome::RateLimited,
            outcome => outcome,
        };
    }
    let code = code.as_str();
    let is = |list: &[&str]| !code.is_empty() && list.contains(&code);

    if (200..300).contains(&status) {
        return Outcome::Success;
    }
    if status == 402 || is(BILLING_CODES) || code.ends_with("_spend_limit_exceeded") {
        return Outcome::Billing;
    }
    if is(NOT_THE_KEYS_FAULT) {
        return Outcome::Other;
    }
    if status == 401 || status == 403 || is(KEY_INVALID_CODES) {
        return Outcome::KeyInvalid;
    }
    if status == 429 || code == "rate_limit_exceeded" || code == "resource_exhausted" || code == "rate_limit_error" {
        if DAILY_MARKERS.iter().any(|m| code.contains(m)) {
            return Outcome::DailyQuota;
        }
        return Outcome::RateLimited;
    }
    if status == 0 || status == 408 || (500..600).contains(&status) || code == "overloaded_error" {
        return Outcome::ServerError;
    }
    if matches!(status, 400 | 404 | 409 | 413 | 422) {
        return Outcome::CallerError;
    }
    Outcome::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn only_answers_that_would_disable_a_key_wait_for_a_check() {
        assert!(needs_key_check(401, Some("unchecked:invalid_api_key")));
        assert!(needs_key_check(403, Some("UNCHECKED:")));
        assert!(needs_key_check(400, Some("unchecked:API_KEY_INVALID")));
        assert!(!needs_key_check(401, Some("invalid_api_key")));
        assert!(!needs_key_check(429, Some("unchecked:rate_limit_exceeded")));
        assert!(!needs_key_check(401, Some("checked:invalid_api_key")));
        assert!(!needs_key_check(401, None));
        assert!(needs_key_check(401, Some("unchecked:model:invalid_api_key")));
        assert!(!needs_key_check(429, Some("unchecked:model:GenerateRequestsPerDay")));
        assert_eq!(bare("unchecked:model:x"), "x");
        assert!(caller_shaped("unchecked:model:x") && caller_shaped("proxy:") && caller_shaped("checked:model:"));
        assert!(!caller_shaped("unchecked:x") && !caller_shaped("rate_limit_exceeded"));
        assert_eq!(bare("Checked:MODEL:x"), "x");
        assert_eq!(strip_prefix("Unchecked:x", KEY_UNCHECKED), Some("x"));
        assert_eq!(strip_prefix("unch", KEY_UNCHECKED), None);
    }

    #[test]
    fn provider_facts_table() {
        let cases: &[(i32, Option<&str>, Outcome)] = &[
            (200, None, Success),
            (201, Some("whatever"), Success),
            (429, Some("rate_limit_exceeded"), RateLimited),
            (429, Some("slow_down"), RateLimited),
            (429, None, RateLimited),
            (429, Some("insufficient_quota"), Billing),
            (429, Some("credit_balance_exhausted"), Billing),
            (429, Some("monthly_spend_limit_exceeded"), Billing),
            (401, Some("invalid_api_key"), KeyInvalid),
            (401, None, KeyInvalid),
            (403, Some("unsupported_country_region_territory"), Other),
            (403, Some("PERMISSION_DENIED"), KeyInvalid),
            (503, Some("server_is_overloaded"), ServerError),
            (500, None, ServerError),
            // Gemini
            (
                429,
                Some("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
                RateLimited,
            ),
            (
                429,
                Some("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
                DailyQuota,
            ),
            (400, Some("API_KEY_INVALID"), KeyInvalid),
            (402, None, Billing),
            (400, Some("FAILED_PRECONDITION"), Billing),
            (504, None, ServerError),
            // Anthropic
            (429, Some("rate_limit_error"), RateLimited),
            (529, Some("overloaded_error"), ServerError),
            (401, Some("authentication_error"), KeyInvalid),
            (403, Some("permission_error"), KeyInvalid),
            // caller errors
            (400, Some("invalid_request_error"), CallerError),
            (413, None, CallerError),
            (400, Some("context_length_exceeded"), CallerError),
            // no answer at all
            (0, None, ServerError),
            (408, None, ServerError),
            (418, None, Other),
            // a path the caller chose: may cool or trip, never disable
            (401, Some("proxy:"), Other),
            (403, Some("proxy:invalid_api_key"), Other),
            (402, Some("proxy:"), Other),
            (429, Some("proxy:insufficient_quota"), Other),
            (429, Some("proxy:rate_limit_exceeded"), RateLimited),
            (429, Some("proxy:GenerateRequestsPerDayPerProjectPerModel"), RateLimited),
            // a model the caller chose: its day's quota or its unavailability only cools
            (
                429,
                Some("model:GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
                RateLimited,
            ),
            (
                429,
                Some("unchecked:model:GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
                RateLimited,
            ),
            (400, Some("unchecked:model:FAILED_PRECONDITION"), RateLimited),
            (400, Some("model:FAILED_PRECONDITION"), RateLimited),
            (429, Some("model:insufficient_quota"), Billing),
            (401, Some("model:invalid_api_key"), KeyInvalid),
            (401, Some("checked:model:invalid_api_key"), Other),
            // chat and embeddings: the same classes; a key checked after a 401/403 is not blamed
            (401, Some("unchecked:invalid_api_key"), KeyInvalid),
            (429, Some("unchecked:rate_limit_exceeded"), RateLimited),
            (401, Some("checked:invalid_api_key"), Other),
            (403, Some("checked:"), Other),
            (429, Some("checked:rate_limit_exceeded"), RateLimited),
            (429, Some("checked:insufficient_quota"), Billing),
            (429, Some("unchecked:insufficient_quota"), Billing),
            (400, Some("unchecked:FAILED_PRECONDITION"), RateLimited),
            (400, Some("FAILED_PRECONDITION"), Billing),
            (503, Some("proxy:"), ServerError),
            (200, Some("proxy:"), Success),
            (404, Some("proxy:not_found"), CallerError),
        ];
        for (status, code, want) in cases {
            assert_eq!(classify(*status, *code), *want, "status {status} code {code:?}");
        }
    }
}
