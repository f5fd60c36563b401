//! A key's circuit breaker: after `pg_keypool.breaker_threshold` consecutive server errors
//! (5xx, overloaded, timeouts) the key leaves rotation for `pg_keypool.breaker_cooldown`; then
//! exactly one trial request is let through. Its success closes the breaker, another server
//! error opens it again. Any answer other than a server error proves the key's provider is up
//! and closes it too.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::policy::outcome::Outcome;
use crate::settings;
use crate::state::slots::KeySlot;

pub enum Admission {
    /// Normal operation.
    Closed,
    /// This request is the half-open breaker's single trial.
    Trial,
    /// Out of rotation until about this time.
    Open(i64),
}

/// When the key is out of rotation (breaker open, or its single trial in flight), until about
/// when; `None` when a request may be admitted. Changes nothing.
pub fn peek(key: &KeySlot, now_ms: i64, lease_ms: i64) -> Option<i64> {
    let open_until = key.breaker_open_until_ms.load(Acquire);
    if open_until == 0 {
        return None;
    }
    if now_ms < open_until {
        return Some(open_until);
    }
    let since = key.trial_since_ms.load(Acquire);
    if since != 0 && now_ms - since <= lease_ms {
        let cooldown = settings::BREAKER_COOLDOWN_MS.get() as i64;
        return Some((since + lease_ms).min(now_ms + cooldown));
    }
    None
}

pub fn admit(key: &KeySlot, now_ms: i64, lease_ms: i64) -> Admission {
    let open_until = key.breaker_open_until_ms.load(Acquire);
    if open_until == 0 {
        return Admission::Closed;
    }
    if now_ms < open_until {
        return Admission::Open(open_until);
    }
    let since = key.trial_since_ms.load(Acquire);
    if since != 0 && now_ms - since <= lease_ms {
        // A trial is in flight; it resolves when it is settled (or its lease runs out).
        let cooldown = settings::BREAKER_COOLDOWN_MS.get() as i64;
        return Admission::Open((since + lease_ms).min(now_ms + cooldown));
    }
    match key.trial_since_ms.compare_exchange(since, now_ms, AcqRel, Relaxed) {
        Ok(_) => Admission::Trial,
        Err(_) => Admission::Open(now_ms + 1),
    }
}

/// Gives the trial back when the trial request was never granted or never sent.
pub fn abandon_trial(key: &KeySlot) {
    key.trial_since_ms.store(0, Release);
}

/// Records the outcome of a call made with this key. Returns the consecutive failures when
/// this outcome opened the breaker.
pub fn record(key: &KeySlot, outcome: Outcome, was_trial: bool, now_ms: i64) -> Option<u32> {
    if outcome == Outcome::ServerError {
        let failures = key.consecutive_failures.fetch_add(1, AcqRel) + 1;
        if was_trial || failures >= settings::BREAKER_THRESHOLD.get() as u32 {
            let cooldown = settings::BREAKER_COOLDOWN_MS.get() as i64;
            let before = key.breaker_open_until_ms.swap(now_ms + cooldown, AcqRel);
            key.trial_since_ms.store(0, Release);
            return (before <= now_ms).then_some(failures);
        }
        None
    } else {
        key.consecutive_failures.store(0, Release);
        key.breaker_open_until_ms.store(0, Release);
        key.trial_since_ms.store(0, Release);
        None
    }
}

/// Puts the key back in rotation at once (an operator re-enabled it).
pub fn reset(key: &KeySlot) {
    key.consecutive_failures.store(0, Release);
    key.breaker_open_until_ms.store(0, Release);
    key.trial_since_ms.store(0, Release);
}
