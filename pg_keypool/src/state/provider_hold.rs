//! What a provider reported of a scope's room (OpenAI's and xAI's `x-ratelimit-remaining-*`,
//! Anthropic's `anthropic-ratelimit-*`), held to until it resets when it is less than the
//! extension counts: someone else uses the key, or the configured limits are too high. Set at
//! settle (settle.rs), spent by reservations (reserve.rs); changed under the scope's lock.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

/// One measure's hold: what is left of the provider's figure, and until when it holds
/// (0: no hold).
#[repr(C)]
#[derive(Default)]
struct Held {
    left: AtomicI64,
    until_ms: AtomicI64,
}

impl Held {
    fn active(&self, now_ms: i64) -> Option<i64> {
        let until = self.until_ms.load(Relaxed);
        (until > now_ms).then(|| self.left.load(Relaxed))
    }

    /// Holds to `left` until `until_ms`; true when no hold was active (a mismatch begins).
    fn hold(&self, left: i64, until_ms: i64, now_ms: i64) -> bool {
        let began = self.active(now_ms).is_none();
        self.left.store(left.max(0), Relaxed);
        self.until_ms.store(until_ms, Relaxed);
        began
    }

    fn release(&self) {
        self.until_ms.store(0, Relaxed);
    }

    fn spend(&self, now_ms: i64, n: i64) {
        if self.active(now_ms).is_some() {
            self.left.fetch_sub(n, Relaxed);
        }
    }

    fn wait(&self, now_ms: i64, n: i64) -> Option<i64> {
        let left = self.active(now_ms)?;
        (left < n).then(|| (self.until_ms.load(Relaxed) - now_ms).max(1))
    }

    fn snapshot(&self, now_ms: i64) -> Report {
        self.active(now_ms)
            .map(|left| (left.max(0), self.until_ms.load(Relaxed)))
    }
}

#[repr(C)]
#[derive(Default)]
pub struct ProviderHold {
    requests: Held,
    tokens: Held,
    /// When a mismatch was last recorded as an event (at most one a minute per scope).
    noted_ms: AtomicI64,
}

/// A provider's report of one measure: what is left and in how many milliseconds it resets.
pub type Report = Option<(i64, i64)>;

impl ProviderHold {
    /// Applies a provider's reports against what the extension counts as left (`ours`, per
    /// measure; `i64::MAX` without a limit): a report below ours holds the scope to it until
    /// it resets, one at or above ours ends a hold. True when a hold began.
    pub fn report(&self, now_ms: i64, (requests, tokens): (Report, Report), ours: (i64, i64)) -> bool {
        let mut began = false;
        for (report, held, ours) in [(requests, &self.requests, ours.0), (tokens, &self.tokens, ours.1)] {
            match report {
                Some((left, reset_ms)) if left < ours => began |= held.hold(left, now_ms + reset_ms.max(1), now_ms),
                Some(_) => held.release(),
                None => {}
            }
        }
        began
    }

    /// How long until one request of `tokens` fits what the provider said is left, if a hold
    /// stops it now.
    pub fn wait(&self, now_ms: i64, tokens: u64) -> Option<i64> {
        let t = self.tokens.wait(now_ms, tokens.min(i64::MAX as u64) as i64);
        match (self.requests.wait(now_ms, 1), t) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// A grant of one request of `tokens` takes from what the provider said is left.
    pub fn spend(&self, now_ms: i64, tokens: u64) {
        self.requests.spend(now_ms, 1);
        self.tokens.spend(now_ms, tokens.min(i64::MAX as u64) as i64);
    }

    /// The holds active now: (requests left, until), (tokens left, until).
    pub fn snapshot(&self, now_ms: i64) -> (Report, Report) {
        (self.requests.snapshot(now_ms), self.tokens.snapshot(now_ms))
    }

    /// Whether a mismatch beginning now should be recorded (none recorded in the last minute).
    pub fn note(&self, now_ms: i64) -> bool {
        let last = self.noted_ms.load(Relaxed);
        now_ms - last >= 60_000 && self.noted_ms.compare_exchange(last, now_ms, Relaxed, Relaxed).is_ok()
    }

    pub fn reset(&self) {
        self.requests.release();
        self.tokens.release();
        self.noted_ms.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_800_000_000_000;

    #[test]
    fn a_report_below_our_count_holds_until_it_resets() {
        let h = ProviderHold::default();
        // Our count has room for 10; the provider says 0 for 20 s.
        assert!(h.report(T, (Some((0, 20_000)), None), (10, i64::MAX)));
        assert_eq!(h.wait(T + 1, 0), Some(19_999));
        assert_eq!(h.wait(T + 20_000, 0), None);
        // A report at or above our count ends a hold.
        assert!(!h.report(T + 10, (Some((12, 20_000)), None), (10, i64::MAX)));
        assert_eq!(h.wait(T + 11, 0), None);
        // A new shortfall begins a new hold; one while held does not.
        assert!(h.report(T + 20, (Some((2, 20_000)), None), (10, i64::MAX)));
        assert!(!h.report(T + 25, (Some((1, 20_000)), None), (10, i64::MAX)));
        h.spend(T + 26, 0);
        assert_eq!(h.wait(T + 27, 0), Some(20_000 - 2));
    }

    #[test]
    fn tokens_are_held_too() {
        let h = ProviderHold::default();
        h.report(T, (None, Some((500, 6_000))), (i64::MAX, 10_000));
        assert_eq!(h.wait(T, 400), None);
        h.spend(T, 400);
        assert_eq!(h.wait(T, 200), Some(6_000));
        assert_eq!(h.snapshot(T), (None, Some((100, T + 6_000))));
    }
}
