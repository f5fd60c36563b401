//! Each caller's minute (the rules are policy/minute.rs): a user's in pools that limit it
//! (`minute_share`, `user_rpm`, `user_tpm`, `user_max_concurrent`), and an API token's
//! (`rpm`, `tpm`, `rpd`, `max_concurrent`, across pools). Checked and counted in the caller's
//! entry (state/callers.rs), and for users in the pool's minute, before a key is tried; given
//! back when no key takes the request; corrected when the reservation is settled or released.
//!
//! A caller is given an entry only when a request of theirs is counted; a caller without one
//! has nothing in their minute, which every limit lets through. Pools and tokens without such
//! limits pay nothing here.

use std::sync::atomic::Ordering::Relaxed;

use crate::catalog::api_tokens::TokenLimits;
use crate::catalog::model::Pool;
use crate::policy::minute::{self, Ask, Capacity};
use crate::policy::shares::WEIGHT_SCALE;
use crate::settings;
use crate::state::callers::{self, CallerMark, TOKEN_SLOT};
use crate::state::members;
use crate::state::shmem::Shared;

/// A request counted against a caller's minute.
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub mark: CallerMark,
    /// The tokens counted.
    pub tokens: u64,
    /// Whether it counts as open until settled or released.
    pub open: bool,
    /// Requests the caller may still make this minute, by their fixed caps and share (None: no
    /// such limit).
    pub left: Option<u64>,
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
    let mut stripe = sh.callers.stripe(hash);
    let (i, fresh) = match stripe.find(hash, pool.slot) {
        Some(i) => (i, false),
        None => {
            // A new entry holds the user's weight, read from the member cache (whose stripe
            // lock is this one: released first) and the pool's weight classes.
            drop(stripe);
            let weight = weight_of(sh, pool, hash);
            stripe = sh.callers.stripe(hash);
            let Some(i) = stripe.find_or_insert(hash, pool.slot, now_ms, lease) else {
                sh.callers.untracked.fetch_add(1, Relaxed);
                return Ok(None);
            };
            let c = stripe.at(i);
            // Made now, or by another backend while this one read the weight.
            let fresh = c.asked_ms == 0;
            if fresh {
                c.weight = weight;
            }
            (i, fresh)
        }
    };
    let c = stripe.at(i);
    c.log.expire(now_ms);
    slot.active.asked(c.asked_ms, now_ms, c.weight);
    c.asked_ms = now_ms;
    if !fresh {
        // A user new to the minute has nothing in it: every limit lets one request through.
        let weights = (u64::from(c.weight.max(1)), slot.active.weight(now_ms));
        // The pool's minute matters only past the fair share: its lock is shared by all.
        let pool_used = if minute::past_fair(&c.log, &limits, &pool.minute_capacity, weights, tokens) {
            slot.minute.with(|log| {
                log.expire(now_ms);
                (log.requests(), log.tokens())
            })
        } else {
            (0, 0)
        };
        let ask = Ask {
            now_ms,
            tokens,
            weight: weights.0,
            active_weight: weights.1,
            pool_used,
            open: match limits.max_concurrent {
                0 => 0,
                _ => stripe.open_at(i).open(now_ms, lease),
            },
        };
        if let Some(wait) = minute::wait(&c.log, &limits, &pool.minute_capacity, &ask) {
            return Err(wait);
        }
    }
    slot.minute.with(|log| log.charge(now_ms, 1, tokens));
    let cap = [
        limits.rpm,
        minute::share_of(pool.minute_capacity.requests, limits.share_milli),
    ];
    Ok(Some(count(
        &stripe,
        i,
        hash,
        tokens,
        (limits.max_concurrent > 0, cap, false),
        now_ms,
    )))
}

/// A user's weight in the pool's fair shares, in thousandths: a member's (their weight class),
/// a guest's 1.
fn weight_of(sh: &Shared, pool: &Pool, hash: u64) -> u32 {
    let class = {
        let stripe = sh.members.stripe(hash);
        stripe.find(hash, pool.slot).and_then(|i| {
            let m = stripe.at(i);
            m.is_member().then_some(m.class)
        })
    };
    let milli = match class {
        Some(class) => sh.pool(pool.slot).lock().classes[class as usize].weight_milli,
        None => WEIGHT_SCALE,
    };
    milli.clamp(1, u32::MAX as i64) as u32
}

/// The hash of an API token's entry.
fn token_hash(instance: i64, token_id: i64) -> u64 {
    // Pool ids are positive: a negative one is no pool's.
    members::user_hash(instance, -token_id.max(1), "")
}

/// Checks one request of `tokens` against an API token's limits and counts it, as [`take`].
pub fn take_token(
    sh: &Shared,
    instance: i64,
    token: &TokenLimits,
    tokens: u64,
    now_ms: i64,
) -> Result<Option<Counted>, i64> {
    if !token.any() {
        return Ok(None);
    }
    let lease = settings::lease_ms();
    let hash = token_hash(instance, token.id);
    let stripe = sh.callers.stripe(hash);
    let i = match stripe.find(hash, TOKEN_SLOT) {
        Some(i) => {
            let c = stripe.at(i);
            c.log.expire(now_ms);
            c.asked_ms = now_ms;
            let ask = Ask {
                now_ms,
                tokens,
                weight: WEIGHT_SCALE as u64,
                active_weight: WEIGHT_SCALE as u64,
                pool_used: (0, 0),
                open: match token.limits.max_concurrent {
                    0 => 0,
                    _ => stripe.open_at(i).open(now_ms, lease),
                },
            };
            let mut wait = minute::wait(&c.log, &token.limits, &Capacity::default(), &ask);
            if token.rpd > 0 && c.day == callers::utc_day(now_ms) && u64::from(c.day_requests) >= token.rpd {
                let rest_of_day = (callers::utc_day_end(now_ms) - now_ms).max(1);
                wait = Some(wait.map_or(rest_of_day, |w| w.max(rest_of_day)));
            }
            if let Some(wait) = wait {
                return Err(wait);
            }
            i
        }
        None => match stripe.find_or_insert(hash, TOKEN_SLOT, now_ms, lease) {
            Some(i) => {
                stripe.at(i).asked_ms = now_ms;
                i
            }
            None => {
                sh.callers.untracked.fetch_add(1, Relaxed);
                return Ok(None);
            }
        },
    };
    let caps = [token.limits.rpm, 0];
    Ok(Some(count(
        &stripe,
        i,
        hash,
        tokens,
        (token.limits.max_concurrent > 0, caps, token.rpd > 0),
        now_ms,
    )))
}

/// Counts a request in entry `i`; `caps`: the caller's request limits of the minute (0: none);
/// `per_day`: a token with an `rpd` (its day is counted too).
fn count(
    stripe: &callers::StripeEntries<'_>,
    i: usize,
    hash: u64,
    tokens: u64,
    (open, caps, per_day): (bool, [u64; 2], bool),
    now_ms: i64,
) -> Counted {
    let c = stripe.at(i);
    c.log.charge(now_ms, 1, tokens);
    let used = c.log.requests();
    let left = caps
        .iter()
        .filter(|&&cap| cap > 0)
        .map(|&cap| cap.saturating_sub(used))
        .min();
    if per_day {
        // Only a token with an `rpd` counts its day (and keeps its entry for the day).
        let today = callers::utc_day(now_ms);
        if c.day != today {
            c.day = today;
            c.day_requests = 0;
        }
        c.day_requests = c.day_requests.saturating_add(1);
    }
    if open {
        stripe.open_at(i).add(now_ms, settings::lease_ms());
    }
    Counted {
        mark: CallerMark {
            index: stripe.index_of(i),
            hash,
            at_ms: now_ms,
        },
        tokens,
        open,
        left,
    }
}

/// Takes back a counted request no key took (`slot`: the pool's slot, or [`TOKEN_SLOT`]).
pub fn give_back(sh: &Shared, slot: u32, counted: &Counted, now_ms: i64) {
    let tokens = counted.tokens.min(i64::MAX as u64) as i64;
    settle(sh, slot, &counted.mark, counted.open, (-1, -tokens), now_ms);
}

/// Corrects a settled or released reservation's count in its caller's minute (and its pool's,
/// for a user): `requests` and `tokens` are added (negative to give back), and it no longer
/// counts as open.
pub fn settle(sh: &Shared, slot: u32, mark: &CallerMark, counted_open: bool, change: (i64, i64), now_ms: i64) {
    if !mark.is_some() {
        return;
    }
    let (requests, tokens) = change;
    if (requests != 0 || tokens != 0) && slot != TOKEN_SLOT && (slot as usize) < sh.pools.len() {
        sh.pool(slot)
            .minute
            .with(|log| log.adjust(now_ms, mark.at_ms, requests, tokens));
    }
    let stripe = sh.callers.stripe(mark.hash);
    let Some(i) = stripe.holding(mark, slot) else {
        return;
    };
    let c = stripe.at(i);
    if requests != 0 || tokens != 0 {
        c.log.adjust(now_ms, mark.at_ms, requests, tokens);
    }
    if requests < 0 && c.day == callers::utc_day(mark.at_ms) {
        c.day_requests = c
            .day_requests
            .saturating_sub(u32::try_from(requests.unsigned_abs()).unwrap_or(u32::MAX));
    }
    if counted_open {
        stripe.open_at(i).remove(mark.at_ms, settings::lease_ms());
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
            (c.log.requests(), c.log.tokens(), stripe.open_at(i).open(now_ms, lease))
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
