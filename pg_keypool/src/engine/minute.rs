//! Each user's minute in pools that limit it (`minute_share`, `user_rpm`, `user_tpm`,
//! `user_max_concurrent`; the rules are policy/minute.rs): checked and counted in the user's
//! caller entry (state/callers.rs) and the pool's minute before a key is tried, given back when
//! no key takes the request, corrected when the reservation is settled or released.
//!
//! A user is given an entry only when a request of theirs is counted; a user without one has
//! nothing in their minute, which every limit lets through. Pools without such limits pay
//! nothing here.

use std::sync::atomic::Ordering::Relaxed;

use crate::catalog::model::Pool;
use crate::policy::minute::{self, Ask};
use crate::settings;
use crate::state::callers::CallerMark;
use crate::state::shmem::Shared;

/// A request counted against its user's minute.
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub mark: CallerMark,
    /// The tokens counted.
    pub tokens: u64,
    /// Whether it counts against `user_max_concurrent` until settled or released.
    pub open: bool,
}

/// Checks one request of `tokens` by the user `hash` against the pool's limits on their minute
/// and counts it: what was counted (`None`: the pool sets no such limits, or the user could not
/// be given an entry and only the keys' limits hold), or how long until it would fit.
pub fn take(sh: &Shared, pool: &Pool, hash: u64, tokens: u64, now_ms: i64) -> Result<Option<Counted>, i64> {
    let limits = pool.user_limits;
    if !limits.any() {
        return Ok(None);
    }
    let slot = sh.pool(pool.slot);
    let lease = settings::lease_ms();
    let stripe = sh.callers.stripe(hash);
    let i = match stripe.find(hash, pool.slot) {
        Some(i) => {
            let c = stripe.at(i);
            c.log.expire(now_ms);
            slot.active.asked(c.asked_ms, now_ms);
            c.asked_ms = now_ms;
            let ask = Ask {
                now_ms,
                tokens,
                active: slot.active.count(now_ms).max(1),
                pool_used: slot.minute.with(|log| {
                    log.expire(now_ms);
                    (log.requests(), log.tokens())
                }),
                open: match limits.max_concurrent {
                    0 => 0,
                    _ => c.open.open(now_ms, lease),
                },
            };
            if let Some(wait) = minute::wait(&c.log, &limits, &pool.minute_capacity, &ask) {
                return Err(wait);
            }
            i
        }
        // Nothing in their minute yet: every limit lets one request through.
        None => match stripe.find_or_insert(hash, pool.slot, now_ms, lease) {
            Some(i) => {
                stripe.at(i).asked_ms = now_ms;
                slot.active.asked(0, now_ms);
                i
            }
            None => {
                sh.callers.untracked.fetch_add(1, Relaxed);
                return Ok(None);
            }
        },
    };
    let c = stripe.at(i);
    c.log.charge(now_ms, 1, tokens);
    slot.minute.with(|log| log.charge(now_ms, 1, tokens));
    let open = limits.max_concurrent > 0;
    if open {
        c.open.add(now_ms, lease);
    }
    Ok(Some(Counted {
        mark: CallerMark {
            index: stripe.index_of(i),
            hash,
            at_ms: now_ms,
        },
        tokens,
        open,
    }))
}

/// Takes back a counted request no key took.
pub fn give_back(sh: &Shared, pool: &Pool, counted: &Counted, now_ms: i64) {
    let slot = sh.pool(pool.slot);
    let tokens = counted.tokens.min(i64::MAX as u64) as i64;
    slot.minute
        .with(|log| log.adjust(now_ms, counted.mark.at_ms, -1, -tokens));
    let stripe = sh.callers.stripe(counted.mark.hash);
    let Some(i) = stripe.holding(&counted.mark, pool.slot) else {
        return;
    };
    let c = stripe.at(i);
    c.log.adjust(now_ms, counted.mark.at_ms, -1, -tokens);
    if counted.open {
        c.open.remove(counted.mark.at_ms, settings::lease_ms());
    }
}

/// Corrects a settled or released reservation's count in its user's minute and the pool's:
/// `requests` and `tokens` are added (negative to give back), and it no longer counts as open.
pub fn settle(sh: &Shared, pool_slot: u32, mark: &CallerMark, counted_open: bool, change: (i64, i64), now_ms: i64) {
    if !mark.is_some() {
        return;
    }
    let (requests, tokens) = change;
    if requests != 0 || tokens != 0 {
        sh.pool(pool_slot)
            .minute
            .with(|log| log.adjust(now_ms, mark.at_ms, requests, tokens));
    }
    let stripe = sh.callers.stripe(mark.hash);
    let Some(i) = stripe.holding(mark, pool_slot) else {
        return;
    };
    let c = stripe.at(i);
    if requests != 0 || tokens != 0 {
        c.log.adjust(now_ms, mark.at_ms, requests, tokens);
    }
    if counted_open {
        c.open.remove(mark.at_ms, settings::lease_ms());
    }
}

/// A user's minute as `keypool_allocation` shows it.
pub struct Standing {
    pub requests: u64,
    pub tokens: u64,
    /// The most of each they may take in a minute (None: no limit of that kind).
    pub request_limit: Option<u64>,
    pub token_limit: Option<u64>,
    /// Reservations open now, when the pool limits them.
    pub open: Option<u32>,
}

/// The user's minute in `pool`, without changing anything; `None` when the pool does not limit
/// its users' minutes.
pub fn standing(sh: &Shared, pool: &Pool, hash: u64, now_ms: i64) -> Option<Standing> {
    let limits = pool.user_limits;
    if !limits.any() {
        return None;
    }
    let smallest = |a: u64, b: u64| match (a, b) {
        (0, 0) => None,
        (0, v) | (v, 0) => Some(v),
        (a, b) => Some(a.min(b)),
    };
    let share = |capacity: u64| match limits.share_milli {
        0 => 0,
        f => minute::share_of(capacity, f),
    };
    let lease = settings::lease_ms();
    let stripe = sh.callers.stripe(hash);
    let (requests, tokens, open) = match stripe.find(hash, pool.slot) {
        Some(i) => {
            let c = stripe.at(i);
            c.log.expire(now_ms);
            (c.log.requests(), c.log.tokens(), c.open.open(now_ms, lease))
        }
        None => (0, 0, 0),
    };
    Some(Standing {
        requests,
        tokens,
        request_limit: smallest(limits.rpm, share(pool.minute_capacity.requests)),
        token_limit: smallest(limits.tpm, share(pool.minute_capacity.tokens)),
        open: (limits.max_concurrent > 0).then_some(open),
    })
}
