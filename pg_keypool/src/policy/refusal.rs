//! Why a reservation was refused, as the result row says it.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    PoolExhausted,
    NoKeys,
    QuotaExceeded,
    /// The pool's or the user's spend budget for the period is used up.
    BudgetExceeded,
    /// The estimate is more than any usable key allows: an error, unless a fallback serves.
    TooLarge,
    /// The user (or their API token) is at their limit of the minute (policy/minute.rs).
    UserRateLimited,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::PoolExhausted => "POOL_EXHAUSTED",
            Refusal::NoKeys => "NO_KEYS",
            Refusal::QuotaExceeded => "QUOTA_EXCEEDED",
            Refusal::BudgetExceeded => "BUDGET_EXCEEDED",
            Refusal::TooLarge => "POOL_EXHAUSTED",
            Refusal::UserRateLimited => "USER_RATE_LIMITED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_large_estimate_reads_as_an_exhausted_pool() {
        // Callers see the documented codes only.
        assert_eq!(Refusal::TooLarge.code(), Refusal::PoolExhausted.code());
        let codes = [
            Refusal::PoolExhausted,
            Refusal::NoKeys,
            Refusal::QuotaExceeded,
            Refusal::BudgetExceeded,
            Refusal::UserRateLimited,
        ]
        .map(|r| r.code());
        assert_eq!(
            codes,
            [
                "POOL_EXHAUSTED",
                "NO_KEYS",
                "QUOTA_EXCEEDED",
                "BUDGET_EXCEEDED",
                "USER_RATE_LIMITED"
            ]
        );
    }
}
