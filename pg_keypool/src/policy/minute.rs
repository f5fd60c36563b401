//! A user's share of a pool's minute: the limits a pool sets on each of its users within any
//! rolling minute, and whether one more request fits them.
//!
//! - `user_rpm` / `user_tpm`: fixed caps per user.
//! - `minute_share` f: no user takes more than f of the pool's requests (and tokens) per
//!   minute, so room is always left for a newcomer.
//! - Fairness while several users keep asking (weighted max-min): a user's fair share is the
//!   pool's capacity of the minute times their weight (as in the daily share: a member's weight,
//!   1 for a guest) over the weights of the users asking now (who asked in the last 10 s, this
//!   one included). Up to it a user is never held back by the others; beyond it only by room the
//!   others may still claim: a user past their fair share is granted only while the minute's
//!   free room exceeds what the other users asking still lack of theirs (counted from the whole
//!   pool's use, which errs towards the user asking). What a user does not ask for flows to the
//!   others: ten seconds after their last request a user holds nothing back.
//! - `user_max_concurrent`: reservations open at once.
//!
//! Pure arithmetic over a caller's log (window.rs), unit-tested on its own.

use crate::policy::window::{CallerLog, Wait, WINDOW_MS};

/// Thousandths of the pool's minute a `minute_share` is given in.
pub const SHARE_SCALE: u64 = 1_000;

/// The longest a caller refused only for concurrency is told to wait: any open reservation may
/// be settled at any moment.
pub const CONCURRENCY_RETRY_MS: i64 = 1_000;

/// A pool's limits on each user's minute (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserLimits {
    /// `minute_share` in thousandths (1..=1000).
    pub share_milli: u64,
    pub rpm: u64,
    pub tpm: u64,
    pub max_concurrent: u32,
}

impl UserLimits {
    /// Whether the pool limits its users' minutes at all.
    pub fn any(&self) -> bool {
        self.share_milli > 0 || self.rpm > 0 || self.tpm > 0 || self.max_concurrent > 0
    }
}

/// What a pool's usable keys take in a minute (0: unlimited, a key without that limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub requests: u64,
    pub tokens: u64,
}

/// One request of `tokens` by a user, as the pool sees it now.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    pub now_ms: i64,
    pub tokens: u64,
    /// This user's weight, in thousandths (as `keypool_set_user_weight` gives it; a guest 1000).
    pub weight: u64,
    /// The weights of the users asking now, this one included.
    pub active_weight: u64,
    /// What the pool's users took of the minute (requests, tokens), this user included; needed
    /// only when the user is [`past_fair`] (otherwise anything).
    pub pool_used: (u64, u64),
    /// The user's reservations open now.
    pub open: u32,
}

/// The user's cap of one measure under a share of a capacity (0: no cap).
pub fn share_of(capacity: u64, share_milli: u64) -> u64 {
    if capacity == 0 || share_milli == 0 {
        return 0;
    }
    (capacity.saturating_mul(share_milli) / SHARE_SCALE).max(1)
}

/// The fair share of one measure of a user of `weight` among users asking with `active_weight`
/// (0: no cap).
pub fn fair_of(capacity: u64, weight: u64, active_weight: u64) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let (w, total) = (weight.max(1) as u128, active_weight.max(weight).max(1) as u128);
    (capacity as u128 * w).div_ceil(total).min(u64::MAX as u128) as u64
}

/// How long until the request fits the user's limits, or `None` when it fits now. `log` must
/// have been expired to `ask.now_ms`.
pub fn wait(log: &CallerLog, limits: &UserLimits, capacity: &Capacity, ask: &Ask) -> Option<i64> {
    let mut wait: Option<i64> = None;
    let mut note = |w: Option<Wait>| {
        let ms = match w {
            None => return,
            Some(Wait::Ms(ms)) => ms,
            // One request more than the whole cap: it fits only a user with nothing else in
            // the minute (a large request is never refused for good).
            Some(Wait::Never) if log.is_empty() => return,
            Some(Wait::Never) => log_clears_in(log, ask.now_ms),
        };
        wait = Some(wait.map_or(ms, |x: i64| x.max(ms)));
    };
    note(log.wait_for(ask.now_ms, 1, ask.tokens, limits.rpm, limits.tpm));
    if limits.share_milli > 0 {
        let (rpm, tpm) = (
            share_of(capacity.requests, limits.share_milli),
            share_of(capacity.tokens, limits.share_milli),
        );
        note(log.wait_for(ask.now_ms, 1, ask.tokens, rpm, tpm));
        // Past the fair share only into room no other active user may still claim.
        let requests = (capacity.requests, log.requests(), ask.pool_used.0, 1);
        let tokens = (capacity.tokens, log.tokens(), ask.pool_used.1, ask.tokens);
        let weights = (ask.weight, ask.active_weight);
        if beyond_fair(requests, weights) || beyond_fair(tokens, weights) {
            let fair = |c: u64| fair_of(c, ask.weight, ask.active_weight);
            note(log.wait_for(
                ask.now_ms,
                1,
                ask.tokens,
                fair(capacity.requests),
                fair(capacity.tokens),
            ));
        }
    }
    if limits.max_concurrent > 0 && ask.open >= limits.max_concurrent {
        wait = Some(wait.map_or(CONCURRENCY_RETRY_MS, |x| x.max(CONCURRENCY_RETRY_MS)));
    }
    wait
}

/// Whether one more request of `tokens` would take the user past their fair share of either
/// measure (only then does the pool's use of the minute matter, [`wait`]).
pub fn past_fair(
    log: &CallerLog,
    limits: &UserLimits,
    capacity: &Capacity,
    (weight, active_weight): (u64, u64),
    tokens: u64,
) -> bool {
    let past =
        |cap: u64, used: u64, more: u64| cap > 0 && used.saturating_add(more) > fair_of(cap, weight, active_weight);
    limits.share_milli > 0
        && (past(capacity.requests, log.requests(), 1) || past(capacity.tokens, log.tokens(), tokens))
}

/// Whether taking `more` of one measure (capacity, the user's use, the pool's use, more) would
/// put a user of `weight` (among users asking with `active_weight`) past their fair share into
/// room the other users asking may still claim.
fn beyond_fair((capacity, used, pool_used, more): (u64, u64, u64, u64), (weight, active_weight): (u64, u64)) -> bool {
    if capacity == 0 || used.saturating_add(more) <= fair_of(capacity, weight, active_weight) {
        return false;
    }
    // What the others' fair shares add up to, less what they used.
    let others = match active_weight.saturating_sub(weight) {
        0 => 0,
        w => fair_of(capacity, w, active_weight),
    };
    let others_lack = others.saturating_sub(pool_used.saturating_sub(used));
    let free = capacity.saturating_sub(pool_used);
    free < more.saturating_add(others_lack)
}

/// When everything in the log has left the window.
fn log_clears_in(log: &CallerLog, now_ms: i64) -> i64 {
    log.newest_ms().map_or(1, |at| (at + WINDOW_MS - now_ms).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_700_000_000_000;

    /// An ask by a user of weight 1 among `active` users of weight 1.
    fn ask(now_ms: i64, active: u64, pool_used: u64) -> Ask {
        Ask {
            now_ms,
            tokens: 0,
            weight: 1_000,
            active_weight: active * 1_000,
            pool_used: (pool_used, 0),
            open: 0,
        }
    }

    fn share(f_milli: u64) -> UserLimits {
        UserLimits {
            share_milli: f_milli,
            ..Default::default()
        }
    }

    #[test]
    fn a_burst_takes_at_most_its_share_and_learns_the_exact_wait() {
        // Seed 000: 15 keys x 15 RPM, minute_share 0.8: 180 of 225.
        let capacity = Capacity {
            requests: 225,
            tokens: 0,
        };
        let limits = share(800);
        // 300 at once (within one millisecond, as the test clock makes them).
        let mut log = CallerLog::default();
        let mut granted = 0;
        for _ in 0..300 {
            log.expire(T);
            if wait(&log, &limits, &capacity, &ask(T, 1, log.requests())).is_none() {
                log.charge(T, 1, 0);
                granted += 1;
            }
        }
        assert_eq!(granted, 180);
        // They leave the window together, a minute after they were granted.
        assert_eq!(
            wait(&log, &limits, &capacity, &ask(T + 300, 1, 180)),
            Some(WINDOW_MS - 300)
        );
        // Spread over 180 ms, they are merged into fewer entries: the wait errs late by less
        // than a merge bucket (5 s), never early.
        let mut log = CallerLog::default();
        for i in 0..180 {
            log.charge(T + i, 1, 0);
        }
        let w = wait(&log, &limits, &capacity, &ask(T + 300, 1, 180)).unwrap_or(0);
        assert!((WINDOW_MS - 300..WINDOW_MS - 300 + 5_000).contains(&w), "{w}");
    }

    #[test]
    fn past_the_fair_share_only_into_room_nobody_else_may_claim() {
        let capacity = Capacity {
            requests: 225,
            tokens: 0,
        };
        let limits = share(800);
        let now = T + 1_000;
        let mut heavy = CallerLog::default();
        heavy.charge(T, 150, 0);
        let mut light = CallerLog::default();
        light.charge(T, 20, 0);
        // Alone in the minute: up to 180.
        assert_eq!(wait(&heavy, &limits, &capacity, &ask(now, 1, 150)), None);
        // Two asking: 113 each. The heavy user, at 150, would take room the light one (at 20)
        // may still claim: it waits until its first grants leave the window.
        assert_eq!(
            wait(&heavy, &limits, &capacity, &ask(now, 2, 170)),
            Some(WINDOW_MS - 1_000)
        );
        // The light one is below its fair share: it goes on (and needs no look at the pool).
        assert_eq!(wait(&light, &limits, &capacity, &ask(now, 2, 170)), None);
        assert!(!past_fair(&light, &limits, &capacity, (1_000, 2_000), 0));
        assert!(past_fair(&heavy, &limits, &capacity, (1_000, 2_000), 0));
        // Once the light user has what it takes (113), the rest flows to the heavy one.
        let mut satisfied = CallerLog::default();
        satisfied.charge(T, 113, 0);
        let mut heavy = CallerLog::default();
        heavy.charge(T, 100, 0);
        assert_eq!(wait(&heavy, &limits, &capacity, &ask(now, 2, 213)), None);
        // A user asking who has taken little holds room for themselves.
        let mut once = CallerLog::default();
        once.charge(T, 1, 0);
        let mut heavy = CallerLog::default();
        heavy.charge(T, 150, 0);
        assert_eq!(
            wait(&heavy, &limits, &capacity, &ask(now, 2, 151)),
            Some(WINDOW_MS - 1_000)
        );
    }

    #[test]
    fn fixed_caps_and_concurrency() {
        let limits = UserLimits {
            rpm: 5,
            tpm: 1_000,
            max_concurrent: 2,
            ..Default::default()
        };
        let none = Capacity::default();
        let mut log = CallerLog::default();
        for i in 0..5 {
            assert_eq!(wait(&log, &limits, &none, &ask(T + i, 1, 0)), None);
            log.charge(T + i, 1, 100);
        }
        assert_eq!(wait(&log, &limits, &none, &ask(T + 10, 1, 0)), Some(WINDOW_MS - 10));
        let busy = Ask {
            open: 2,
            ..ask(T + 10, 1, 0)
        };
        let empty = CallerLog::default();
        assert_eq!(wait(&empty, &limits, &none, &busy), Some(CONCURRENCY_RETRY_MS));
        // Tokens: 2,000 asked of a 1,000 cap fits only an empty minute.
        let big = Ask {
            tokens: 2_000,
            ..ask(T + 10, 1, 0)
        };
        assert_eq!(wait(&empty, &limits, &none, &big), None);
        assert_eq!(wait(&log, &limits, &none, &big), Some(WINDOW_MS - 10 + 4));
    }

    #[test]
    fn shares_of_an_unlimited_pool_limit_nothing() {
        assert_eq!(share_of(0, 800), 0);
        assert_eq!(fair_of(0, 1_000, 3_000), 0);
        assert_eq!(share_of(225, 800), 180);
        assert_eq!(share_of(1, 10), 1);
        assert_eq!(fair_of(225, 1_000, 2_000), 113);
        // Weighted like the daily share: a pro user of weight 5 beside a free one.
        assert_eq!(fair_of(240, 5_000, 6_000), 200);
        assert_eq!(fair_of(240, 1_000, 6_000), 40);
    }

    #[test]
    fn a_heavier_user_is_held_back_later() {
        let capacity = Capacity {
            requests: 240,
            tokens: 0,
        };
        let limits = share(1_000);
        let now = T + 1_000;
        let mut pro = CallerLog::default();
        pro.charge(T, 150, 0);
        let mut free = CallerLog::default();
        free.charge(T, 30, 0);
        // Both asking, fair shares of 200 (the pro user, weight 5) and 40 (the free one): the
        // pro user at 150 goes on.
        let pro_ask = Ask {
            weight: 5_000,
            active_weight: 6_000,
            ..ask(now, 2, 180)
        };
        assert_eq!(wait(&pro, &limits, &capacity, &pro_ask), None);
        let mut free_more = CallerLog::default();
        free_more.charge(T, 41, 0);
        let free_ask = Ask {
            weight: 1_000,
            active_weight: 6_000,
            ..ask(now, 2, 191)
        };
        // The free user past its 40 would take room the pro user still lacks (49 left, 50
        // lacking): it waits; at 30 it goes on.
        assert_eq!(wait(&free_more, &limits, &capacity, &free_ask), Some(WINDOW_MS - 1_000));
        assert_eq!(
            wait(
                &free,
                &limits,
                &capacity,
                &Ask {
                    pool_used: (180, 0),
                    ..free_ask
                }
            ),
            None
        );
    }
}
