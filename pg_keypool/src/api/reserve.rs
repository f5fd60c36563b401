//! `keypool_reserve`: the hot path. Picks a key of the pool whose scope has room right now and
//! charges one request and the token estimate to it, atomically.
//!
//! Selection, tier by tier (keys of the best priority first; a worse tier only when every key of
//! the better ones has no room): the user's assigned key first (assign.rs assigns them); then,
//! among the tier's keys that are ready (not disabled, scope not cooling, circuit breaker not
//! open), a cursor shared by all sessions picks the next one in turn: a round-robin over the
//! whole server, not per client, that stays even when keys drop out. If that key's scope has no
//! room, the next ready key in id order is tried, and so on. The first key that fits is granted. Refusals are rows: `NO_KEYS` when no key is usable at all, `POOL_EXHAUSTED`
//! with the exact time until the first key frees up otherwise.
//!
//! Cost: no table access (configuration is cached, config.rs), one scope lock per key tried, a
//! few atomics; no WAL, no row locks.

use std::rc::Rc;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::AnyNumeric;

use crate::api::fallbacks::{self, ChainRefusal};
use crate::catalog::api_tokens;
use crate::catalog::config::{self};
use crate::catalog::grants::Privilege;
use crate::catalog::model::{Config, Key, Tier};
use crate::catalog::privilege;
use crate::engine::access::{self};
use crate::engine::args::check_tokens;
use crate::engine::args::check_user_id;
use crate::engine::assign;
use crate::engine::budgets::{self};
use crate::engine::composite::{self, Value};
use crate::engine::minute::{self, Counted};
use crate::engine::quota::{self, Allocation, Take, Ticket};
use crate::errors::{self, Code};
use crate::policy::calendar;
use crate::policy::minute::CONCURRENCY_RETRY_MS;
use crate::policy::money::Budget;
use crate::policy::refusal::Refusal;
use crate::policy::window::Wait;
use crate::settings;
use crate::state::breaker::{self, Admission};
use crate::state::callers::{CallerMark, TOKEN_SLOT};
use crate::state::clock;
use crate::state::members;
use crate::state::reservation::Hold;
use crate::state::reservation::{
    self, Record, FLAG_BORROWED, FLAG_CALLER_OPEN, FLAG_CONCURRENT, FLAG_TOKEN_OPEN, FLAG_TRIAL,
};
use crate::state::shmem::{self, Shared};
use crate::state::slots::Counter;

pub enum Answer {
    Granted {
        key: usize,
        /// The pool that served (index into `Config::pools`): the one asked, or a fallback.
        pool: usize,
        reservation_id: u64,
        /// When the key's windows were charged (this database's clock).
        granted_at_ms: i64,
        allocation: Allocation,
        /// What it holds of the pool's spend budget (millionths), when one applies.
        held: Option<u64>,
        /// Requests the caller may still make this minute (user's and API token's limits).
        minute_left: Option<u64>,
    },
    Refused {
        refusal: Refusal,
        retry_after_ms: Option<i64>,
        allocation: Allocation,
    },
}

/// What a granted reservation takes of the user's share.
struct Share {
    pool_slot: u32,
    ticket: Option<Ticket>,
    preferred: i64,
    /// The role reserving: only it (or an administrator of the pool) may settle or release.
    role: pg_sys::Oid,
    /// What it holds of the pool's budget, if the pool has one.
    hold: Option<(Budget, Hold)>,
    /// Where it was counted against the user's minute, if the pool limits that.
    caller: Option<Counted>,
    /// Where it was counted against the caller's API token, if it has limits.
    token: Option<Counted>,
}

impl Share {
    /// Requests the caller may still make this minute: the smaller of what the user's and the
    /// API token's limits leave.
    fn minute_left(&self) -> Option<u64> {
        [self.caller, self.token].iter().flatten().filter_map(|c| c.left).min()
    }
}

/// What an API token's limits counted for a call: given back when dropped unless a grant kept
/// it (`counted` taken), so that a refusal or an error raised on the way gives it back.
struct TokenHeld<'a> {
    sh: &'a Shared,
    counted: Option<Counted>,
}

impl Drop for TokenHeld<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.counted.take() {
            minute::give_back(self.sh, TOKEN_SLOT, &c, clock::now_ms());
        }
    }
}

/// A slot this backend cached was bound to another row meanwhile: reload and try again.
struct Rebound;

/// Reserves capacity for `user`'s request of about `est_tokens` tokens, for the calling role,
/// which must hold `use` on `pool_name`: in that pool, then down its fallback chain (links the
/// caller may use and, when `within` is given, that it lists). `token`: the SHA-256 of the API
/// token the caller holds, whose limits apply too.
pub fn reserve(
    user: &str,
    pool_name: &str,
    est_tokens: i64,
    (within, token): (Option<&[String]>, Option<&[u8]>),
) -> (Rc<Config>, Answer) {
    let sh = shmem::shared();
    if unsafe { pg_sys::RecoveryInProgress() } {
        errors::error(Code::ERRCODE_READ_ONLY_SQL_TRANSACTION, "keypool_reserve cannot run on a standby")
            .detail("Rate windows live in the shared memory of the server that grants; a standby would grant the same capacity again.")
            .hint("Reserve on the primary.")
            .raise();
    }
    crate::catalog::failover::end_recovery_if_pending(sh);
    let cfg = config::current();
    access::pool(&cfg, pool_name, Privilege::Use);
    if within.is_some_and(|w| !w.iter().any(|p| p == pool_name)) {
        // The caller (an API token) may not reach this pool: as if the role could not use it.
        access::denied_pool(pool_name, Privilege::Use);
    }
    // The API token's limits, across pools and workers, before any pool is tried; what they
    // counted is given back unless a grant keeps it (also when an error ends the call).
    let token = match token {
        None => None,
        Some(digest) => {
            let Some(limits) = api_tokens::limits_of(sh, &cfg, digest) else {
                // Revoked or expired since the caller was let in.
                errors::error(Code::ERRCODE_INSUFFICIENT_PRIVILEGE, "the API token is not valid").raise()
            };
            match minute::take_token(sh, cfg.owner.instance, &limits, est_tokens as u64, clock::now_ms()) {
                Ok(counted) => counted,
                Err(wait) => {
                    let pool = assign::pool_or_error(&cfg, pool_name);
                    let (allocation, _, _) = quota::view(sh, &cfg, pool, user, clock::now_ms());
                    let answer = Answer::Refused {
                        refusal: Refusal::UserRateLimited,
                        retry_after_ms: Some(wait),
                        allocation,
                    };
                    return (cfg, answer);
                }
            }
        }
    };
    let mut held = TokenHeld { sh, counted: token };
    let (cfg, answer, too_big) = reserve_chain(sh, cfg, (pool_name, within), user, est_tokens, token);
    if let Answer::Granted { .. } = answer {
        held.counted = None;
    }
    drop(held);
    if too_big {
        too_large(est_tokens, pool_name);
    }
    (cfg, answer)
}

/// Reserves in the pool, then down its fallback chain; also says whether the first refusal
/// was an estimate too large for any key (an error unless a fallback served).
fn reserve_chain(
    sh: &'static Shared,
    cfg: Rc<Config>,
    (pool_name, within): (&str, Option<&[String]>),
    user: &str,
    est_tokens: i64,
    token: Option<Counted>,
) -> (Rc<Config>, Answer, bool) {
    let (cfg, answer) = reserve_in(sh, cfg, pool_name, user, est_tokens, token);
    let (first, first_wait, allocation) = match &answer {
        Answer::Granted { .. } => return (cfg, answer, false),
        Answer::Refused {
            refusal,
            retry_after_ms,
            allocation,
        } => (*refusal, *retry_after_ms, *allocation),
    };
    let origin = assign::pool_or_error(&cfg, pool_name);
    let links = if fallbacks::falls_through(origin, &first) {
        fallbacks::links(&cfg, origin, within)
    } else {
        Vec::new()
    };
    if links.is_empty() {
        return (cfg, answer, first == Refusal::TooLarge);
    }
    let mut chain = ChainRefusal::default();
    chain.note(&first, first_wait);
    let mut cfg = cfg;
    for link in &links {
        let (c, answer) = reserve_in(sh, cfg, link, user, est_tokens, token);
        cfg = c;
        match answer {
            Answer::Granted { .. } => {
                if let Some(origin) = cfg.pool_by_name(pool_name) {
                    let today = origin.day(clock::now_ms()).0;
                    sh.pool(origin.slot).fell_through.add(today);
                }
                return (cfg, answer, false);
            }
            Answer::Refused {
                refusal,
                retry_after_ms,
                ..
            } => chain.note(&refusal, retry_after_ms),
        }
    }
    let (refusal, retry_after_ms) = chain.answer();
    let answer = Answer::Refused {
        refusal,
        retry_after_ms,
        allocation,
    };
    (cfg, answer, first == Refusal::TooLarge)
}

/// Reserves on the user's own keys: the answer, or `None` to go on with the shared keys (their
/// own keys are all at their limits, cooling or disabled, and the pool lets owners fall back).
fn reserve_own(
    sh: &'static Shared,
    mut cfg: Rc<Config>,
    (pool_name, mut ix): (&str, usize),
    user: &str,
    est_tokens: i64,
    (role, token): (pg_sys::Oid, Option<Counted>),
) -> (Rc<Config>, Option<Answer>) {
    let share = Share {
        pool_slot: cfg.pools[ix].slot,
        ticket: None,
        preferred: 0,
        role,
        hold: None,
        caller: None,
        token,
    };
    for _ in 0..3 {
        let outcome = try_reserve(sh, &cfg, (ix, Some(user)), est_tokens, &share);
        let pool = &cfg.pools[ix];
        match outcome {
            Ok(Ok(Granted {
                key,
                reservation_id,
                at_ms: granted_at_ms,
                held,
            })) => {
                let (allocation, _, _) = quota::view(sh, &cfg, pool, user, granted_at_ms);
                let answer = Answer::Granted {
                    key,
                    pool: ix,
                    reservation_id,
                    granted_at_ms,
                    allocation,
                    held,
                    minute_left: share.minute_left(),
                };
                return (cfg, Some(answer));
            }
            Ok(Err(_)) if pool.owner_fallback => return (cfg, None),
            Ok(Err((refusal, retry_after_ms))) => {
                let (allocation, _, _) = quota::view(sh, &cfg, pool, user, clock::now_ms());
                let answer = Answer::Refused {
                    refusal,
                    retry_after_ms,
                    allocation,
                };
                return (cfg, Some(answer));
            }
            Err(Rebound) => {
                cfg = config::reload_now();
                ix = pool_index(&cfg, pool_name);
            }
        }
    }
    (cfg, None)
}

/// Gives back the request a reservation took of the user's share.
fn give_back_ticket(sh: &Shared, pool_slot: u32, ticket: &Option<Ticket>, allocation: &mut Allocation) {
    if let Some(t) = ticket {
        quota::give_back(sh, pool_slot, t);
        allocation.used = allocation.used.saturating_sub(1);
    }
}

/// The index of a pool in the configuration (raises when it does not exist).
fn pool_index(cfg: &Config, pool_name: &str) -> usize {
    match cfg.pools_by_name.get(pool_name) {
        Some(&ix) => ix,
        None => errors::undefined(format!("pool \"{pool_name}\" does not exist"))
            .hint("Create it with keypool_create_pool().")
            .raise(),
    }
}

fn too_large(est_tokens: i64, pool_name: &str) -> ! {
    errors::invalid(format!(
        "est_tokens ({est_tokens}) is more than any usable key of pool \"{pool_name}\" allows"
    ))
    .detail("Each key's scope has a tokens-per-minute or tokens-per-day limit below the estimate, so the request could never be granted.")
    .hint("Split the request, or add a key whose limits allow it.")
    .raise()
}

/// Reserves in one pool (the caller's right to it was checked).
fn reserve_in(
    sh: &'static Shared,
    mut cfg: Rc<Config>,
    pool_name: &str,
    user: &str,
    est_tokens: i64,
    token: Option<Counted>,
) -> (Rc<Config>, Answer) {
    let role = privilege::caller();
    let mut ix = pool_index(&cfg, pool_name);
    let rebound = {
        let pool = &cfg.pools[ix];
        !sh.pool(pool.slot).tag.is(cfg.owner, pool.id)
    };
    if rebound {
        // The pool's slot was taken back from an older configuration of ours: bind again.
        cfg = config::reload_now();
        ix = pool_index(&cfg, pool_name);
    }
    let now = clock::now_ms();
    crate::engine::member_load::ensure_loaded(sh, &cfg, &cfg.pools[ix]);
    // The user's own keys first (bring your own key): outside their share and the pool's budget.
    let owned = &cfg.pools[ix].owned;
    if !owned.is_empty() && owned.contains_key(user) {
        let (c, own) = reserve_own(sh, cfg, (pool_name, ix), user, est_tokens, (role, token));
        cfg = c;
        if let Some(answer) = own {
            return (cfg, answer);
        }
        ix = pool_index(&cfg, pool_name);
    }
    let pool = &cfg.pools[ix];
    if !pool.keys.iter().any(|&k| cfg.usable(&cfg.keys[k])) {
        let (allocation, _, _) = quota::view(sh, &cfg, pool, user, now);
        return (
            cfg,
            Answer::Refused {
                refusal: Refusal::NoKeys,
                retry_after_ms: None,
                allocation,
            },
        );
    }
    // What the reservation will hold of a budget, and what the user spent in this period if
    // shared memory does not know it, found before anything is taken (a key without a price is
    // an error).
    let budget = pool.budget.map(|b| {
        let hash = members::user_hash(cfg.owner.instance, pool.id, user);
        let recorded = b.per_user.and_then(|_| {
            let (start, _) = crate::policy::money::period(&b, pool.tz, now);
            budgets::recorded_user_spend(sh, &cfg, pool, hash, start)
        });
        (
            b,
            budgets::worst_estimate(&cfg, pool, &b, est_tokens as u64),
            (hash, recorded),
        )
    });
    let (ticket, preferred, mut allocation) = match quota::take(sh, &cfg, pool, user, now) {
        Take::Exceeded {
            allocation,
            retry_after_ms,
        } => {
            let refusal = Refusal::QuotaExceeded;
            return (
                cfg,
                Answer::Refused {
                    refusal,
                    retry_after_ms: Some(retry_after_ms),
                    allocation,
                },
            );
        }
        Take::Granted {
            ticket,
            preferred,
            allocation,
        } => (ticket, preferred, allocation),
    };
    let hold = match budget {
        None => None,
        Some((b, amount, user_spend)) => match budgets::take(sh, pool, &b, user_spend, amount, now) {
            Ok(hold) => Some((b, hold)),
            Err(wait) => {
                give_back_ticket(sh, pool.slot, &ticket, &mut allocation);
                return (
                    cfg,
                    Answer::Refused {
                        refusal: Refusal::BudgetExceeded,
                        retry_after_ms: Some(wait),
                        allocation,
                    },
                );
            }
        },
    };
    // The user's minute, in pools that limit it (after the day: a share used up for the day
    // says more than a wait of seconds).
    let caller = if pool.user_limits.any() {
        let hash = members::user_hash(cfg.owner.instance, pool.id, user);
        match minute::take(sh, pool, hash, est_tokens as u64, now) {
            Ok(counted) => counted,
            Err(wait) => {
                give_back_ticket(sh, pool.slot, &ticket, &mut allocation);
                if let Some((_, h)) = &hold {
                    budgets::adjust(sh, pool.slot, h, -(h.amount as i64));
                }
                return (
                    cfg,
                    Answer::Refused {
                        refusal: Refusal::UserRateLimited,
                        retry_after_ms: Some(wait),
                        allocation,
                    },
                );
            }
        }
    } else {
        None
    };
    let share = Share {
        pool_slot: pool.slot,
        ticket,
        preferred,
        role,
        hold,
        caller,
        token,
    };
    // Gives back what the share, budget and minute hold when no key is granted.
    let give_back = |sh: &Shared, share: &Share, allocation: &mut Allocation| {
        give_back_ticket(sh, share.pool_slot, &share.ticket, allocation);
        if let Some((_, h)) = &share.hold {
            budgets::adjust(sh, share.pool_slot, h, -(h.amount as i64));
        }
        if let Some(counted) = &share.caller {
            minute::give_back(sh, share.pool_slot, counted, clock::now_ms());
        }
    };
    for _ in 0..3 {
        match try_reserve(sh, &cfg, (ix, None), est_tokens, &share) {
            Ok(Ok(Granted {
                key,
                reservation_id,
                at_ms: granted_at_ms,
                held,
            })) => {
                return (
                    cfg,
                    Answer::Granted {
                        key,
                        pool: ix,
                        reservation_id,
                        granted_at_ms,
                        allocation,
                        held,
                        minute_left: share.minute_left(),
                    },
                );
            }
            Ok(Err((refusal, retry_after_ms))) => {
                give_back(sh, &share, &mut allocation);
                return (
                    cfg,
                    Answer::Refused {
                        refusal,
                        retry_after_ms,
                        allocation,
                    },
                );
            }
            Err(Rebound) => {
                cfg = config::reload_now();
                ix = pool_index(&cfg, pool_name);
            }
        }
    }
    give_back(sh, &share, &mut allocation);
    errors::error(
        Code::ERRCODE_INTERNAL_ERROR,
        "pg_keypool: shared-memory slots kept moving during a reservation",
    )
    .detail(format!(
        "The slots of pool \"{pool_name}\"'s keys or accounts were bound to other rows three times while this call reserved."
    ))
    .hint("Retry the call; if it keeps happening, report it with the server log.")
    .raise()
}

/// A key that took the request.
struct Granted {
    /// Index into `Config::keys`.
    key: usize,
    reservation_id: u64,
    at_ms: i64,
    /// What the reservation holds of a spend budget, if one applies.
    held: Option<u64>,
}

/// A granted key, or why not.
type Outcome = Result<Granted, (Refusal, Option<i64>)>;

/// Pools of up to this many keys spread load exactly evenly over their ready keys (one pass to
/// count them); larger pools go round the keys from the shared cursor, which stays O(1) while
/// most keys are ready.
const EXACT_SPREAD_KEYS: usize = 64;

/// Tries the pool's shared keys, or with `owner` that user's own keys.
fn try_reserve(
    sh: &Shared,
    cfg: &Config,
    (pool_ix, owner): (usize, Option<&str>),
    est_tokens: i64,
    share: &Share,
) -> Result<Outcome, Rebound> {
    let pool = &cfg.pools[pool_ix];
    let tiers: &[Tier] = match owner {
        None => &pool.tiers,
        Some(user) => pool.owned.get(user).map_or(&[][..], Vec::as_slice),
    };
    let now = clock::now_ms();
    let lease = settings::lease_ms();
    let tokens = est_tokens as u64;
    let mut wait: Option<Wait> = None;
    let mut enabled = 0;
    // Tries one key: its reservation id (and budget hold) if granted; otherwise notes when it
    // could be.
    let mut attempt = |key: &Key| -> Result<Option<(u64, Option<u64>)>, Rebound> {
        let w = match readiness(sh, cfg, key, now, lease) {
            Readiness::Disabled => return Ok(None),
            Readiness::Later(w) => w,
            Readiness::Ready => match try_key(sh, cfg, key, now, lease, est_tokens, tokens, share)? {
                Ok(granted) => {
                    enabled += 1;
                    return Ok(Some(granted));
                }
                Err(w) => w,
            },
        };
        enabled += 1;
        wait = Some(wait.map_or(w, |x| x.min(w)));
        Ok(None)
    };

    // Tier by tier, best priority first: a worse tier serves only when every key of the better
    // ones is at its limits, cooling or disabled.
    let preferred = cfg
        .keys_by_id
        .get(&share.preferred)
        .copied()
        .filter(|&k| cfg.keys[k].pool_id == pool.id);
    if tiers.is_empty() {
        return Ok(Err((Refusal::NoKeys, None)));
    }
    // Each call moves the shared cursor on by one, so load spreads over the whole server, not
    // per client.
    let turn = sh.pool(pool.slot).cursor.fetch_add(1, Ordering::Relaxed) as usize;
    for tier in tiers {
        // The user's assigned key first, within its tier.
        let preferred = preferred.filter(|&k| cfg.keys[k].priority == tier.priority);
        if let Some(k) = preferred {
            if let Some((reservation_id, held)) = attempt(&cfg.keys[k])? {
                return Ok(Ok(Granted {
                    key: k,
                    reservation_id,
                    at_ms: now,
                    held,
                }));
            }
        }
        // Then round the tier from where the cursor points.
        let keys = &tier.keys;
        let n = keys.len();
        let first = if n <= EXACT_SPREAD_KEYS {
            // Start at the turn-th *ready* key, so that keys out of rotation do not hand their
            // share to their neighbour.
            let is_ready = |k: usize| matches!(readiness(sh, cfg, &cfg.keys[k], now, lease), Readiness::Ready);
            let ready = keys.iter().filter(|&&k| is_ready(k)).count();
            match ready {
                0 => 0,
                _ => keys
                    .iter()
                    .enumerate()
                    .filter(|(_, &k)| is_ready(k))
                    .nth(turn % ready)
                    .map_or(0, |(i, _)| i),
            }
        } else {
            turn % n
        };
        for i in 0..n {
            let key_index = keys[(first + i) % n];
            if Some(key_index) == preferred {
                continue;
            }
            if let Some((reservation_id, held)) = attempt(&cfg.keys[key_index])? {
                return Ok(Ok(Granted {
                    key: key_index,
                    reservation_id,
                    at_ms: now,
                    held,
                }));
            }
        }
    }
    if enabled == 0 {
        return Ok(Err((Refusal::NoKeys, None)));
    }
    match wait {
        Some(Wait::Never) => Ok(Err((Refusal::TooLarge, None))),
        Some(Wait::Ms(ms)) => Ok(Err((Refusal::PoolExhausted, Some(ms.max(1))))),
        None => Ok(Err((Refusal::PoolExhausted, Some(1)))),
    }
}

enum Readiness {
    Disabled,
    /// Out for now (cooling scope, open circuit breaker); back after this wait.
    Later(Wait),
    Ready,
}

/// Whether a key could take a request now, from cheap checks only (no lock).
fn readiness(sh: &Shared, cfg: &Config, key: &Key, now: i64, lease: i64) -> Readiness {
    let scope = cfg.scope_of(key);
    if key.disabled || scope.disabled {
        return Readiness::Disabled;
    }
    if let Some((until, _)) = sh.scope(scope.slot).cooling(now) {
        return Readiness::Later(Wait::Ms(until - now));
    }
    match breaker::peek(sh.key(key.slot), now, lease) {
        Some(until) => Readiness::Later(Wait::Ms((until - now).max(1))),
        None => Readiness::Ready,
    }
}

/// Tries to charge one request to `key`'s scope and open a reservation: the reservation id and
/// what it holds of a budget, or how long until the scope has room.
#[allow(clippy::too_many_arguments)]
fn try_key(
    sh: &Shared,
    cfg: &Config,
    key: &Key,
    now: i64,
    lease: i64,
    est_tokens: i64,
    tokens: u64,
    share: &Share,
) -> Result<Result<(u64, Option<u64>), Wait>, Rebound> {
    let scope = cfg.scope_of(key);
    let key_slot = sh.key(key.slot);
    if !key_slot.tag.is(cfg.owner, key.id) {
        return Err(Rebound);
    }
    let trial = match breaker::admit(key_slot, now, lease) {
        Admission::Closed => false,
        Admission::Trial => true,
        Admission::Open(until) => return Ok(Err(Wait::Ms((until - now).max(1)))),
    };
    let scope_slot = sh.scope(scope.slot);
    let charged = {
        let mut windows = scope_slot.lock();
        if !windows.tag().is(cfg.owner, scope.id) {
            drop(windows);
            if trial {
                breaker::abandon_trial(key_slot);
            }
            return Err(Rebound);
        }
        if let Some(max) = key.max_concurrent {
            if key_slot.open.open(now, lease) >= max {
                drop(windows);
                if trial {
                    breaker::abandon_trial(key_slot);
                }
                // Any of its reservations may be settled at any moment; the lease ends the last.
                let wait = key_slot.open.next_expiry_ms(now, lease).min(CONCURRENCY_RETRY_MS);
                return Ok(Err(Wait::Ms(wait)));
            }
        }
        // The provider said it has less room than the windows count (settle.rs): held to that.
        if let Some(wait) = scope_slot.provider.wait(now, tokens) {
            drop(windows);
            if trial {
                breaker::abandon_trial(key_slot);
            }
            return Ok(Err(Wait::Ms(wait)));
        }
        let charged = windows.try_charge(now, tokens, |t| calendar::day_bounds(scope.tz, t));
        if let Ok(charge) = &charged {
            scope_slot.provider.spend(now, tokens);
            if key.max_concurrent.is_some() {
                key_slot.open.add(charge.at_ms, lease);
            }
        }
        charged
    };
    match charged {
        Ok(charge) => {
            // What this reservation holds of the budget: the granted key's estimate (every usable
            // key has a price: reserve_in checked it with the dearest).
            let held = share.hold.map_or_else(Hold::default, |(b, h)| Hold {
                amount: key
                    .price
                    .map_or(h.amount, |p| crate::policy::money::estimate(&p, tokens, b.default_cost)),
                ..h
            });
            let record = Record {
                dboid: cfg.owner.dboid,
                scope_slot: scope.slot,
                key_slot: key.slot,
                scope_id: scope.id,
                key_id: key.id,
                at_ms: charge.at_ms,
                day_start_ms: charge.day_start_ms,
                est_tokens,
                flags: if trial { FLAG_TRIAL } else { 0 }
                    | if key.max_concurrent.is_some() {
                        FLAG_CONCURRENT
                    } else {
                        0
                    }
                    | if share.ticket.is_some_and(|t| t.borrowed) {
                        FLAG_BORROWED
                    } else {
                        0
                    }
                    | if share.caller.is_some_and(|c| c.open) {
                        FLAG_CALLER_OPEN
                    } else {
                        0
                    }
                    | if share.token.is_some_and(|c| c.open) {
                        FLAG_TOKEN_OPEN
                    } else {
                        0
                    },
                pool_slot: share.pool_slot,
                member_index: share.ticket.map_or(u32::MAX, |t| t.index),
                member_hash: share.ticket.map_or(0, |t| t.hash),
                member_day: share.ticket.map_or(0, |t| t.day),
                role: share.role.to_u32(),
                hold: held,
                caller: share.caller.map_or(CallerMark::NONE, |c| c.mark),
                token: share.token.map_or(CallerMark::NONE, |c| c.mark),
            };
            if let Some((_, h)) = &share.hold {
                // The hold was for the pool's dearest key: keep what this key's estimate needs.
                budgets::adjust(sh, share.pool_slot, h, held.amount as i64 - h.amount as i64);
            }
            let reservation_id = reservation::open(sh, &record, now, lease);
            key_slot.add(Counter::Requests, 1);
            key_slot.last_used_ms.store(now, Ordering::Relaxed);
            Ok(Ok((reservation_id, held.held().then_some(held.amount))))
        }
        Err(w) => {
            if trial {
                breaker::abandon_trial(key_slot);
            }
            Ok(Err(w))
        }
    }
}

/// The result row, in the column order of the `keypool_reservation` type.
fn result_row<'a>(cfg: &'a Config, answer: &'a Answer) -> [Value<'a>; 17] {
    let share = |a: &Allocation| {
        [
            a.remaining().map_or(Value::Null, |r| Value::Int8(r as i64)),
            a.allocated.map_or(Value::Null, |r| Value::Int8(r as i64)),
            Value::Text(a.warning()),
        ]
    };
    match answer {
        Answer::Granted {
            key,
            pool,
            reservation_id,
            granted_at_ms,
            allocation,
            held,
            minute_left,
        } => {
            let k = &cfg.keys[*key];
            let served = cfg.pools.get(*pool).map_or(Value::Null, |p| Value::Text(&p.name));
            let [remaining, allocated, warning] = share(allocation);
            [
                Value::Bool(true),
                Value::Int8(*reservation_id as i64),
                Value::Int8(k.id),
                Value::Text(&k.provider),
                Value::opt_text(k.model.as_deref()),
                Value::Text(&k.base_url),
                // A keyless key (a local server) has no secret to hand out.
                Value::opt_text(Some(k.secret.as_str()).filter(|s| !s.is_empty())),
                Value::Null,
                Value::Null,
                Value::Text(&k.label),
                remaining,
                allocated,
                warning,
                Value::Int8(clock::timestamptz_datum(*granted_at_ms)),
                served,
                held.map_or(Value::Null, |micros| Value::Datum(money_datum(micros))),
                minute_left.map_or(Value::Null, |n| Value::Int8(n.min(i64::MAX as u64) as i64)),
            ]
        }
        Answer::Refused {
            refusal,
            retry_after_ms,
            allocation,
        } => {
            let [remaining, allocated, warning] = share(allocation);
            [
                Value::Bool(false),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Text(refusal.code()),
                retry_after_ms.map_or(Value::Null, Value::Int8),
                Value::Null,
                remaining,
                allocated,
                warning,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
            ]
        }
    }
}

/// A `numeric` datum of an amount in millionths.
fn money_datum(micros: u64) -> pg_sys::Datum {
    let text = crate::policy::money::to_decimal(micros);
    match AnyNumeric::try_from(text.as_str()) {
        Ok(n) => n.into_datum().unwrap_or(pg_sys::Datum::from(0)),
        Err(_) => errors::error(Code::ERRCODE_INTERNAL_ERROR, "pg_keypool: cannot form an amount").raise(),
    }
}

crate::pg_finfo_v1!(pg_finfo_keypool_reserve_c);

/// Most pool names a caller may pass as `within`.
const MAX_WITHIN: usize = 1024;

/// `keypool_reserve(user_id text, pool text, est_tokens bigint, within text[]) RETURNS
/// keypool_reservation`,
/// written against the function-call interface directly so that the result row costs no type
/// lookup (see composite.rs).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keypool_reserve_c(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let user_id = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0);
        let pool = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 1);
        let est_tokens = pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 2);
        let user = check_user_id(user_id);
        let Some(pool) = pool else {
            errors::null_argument("pool").raise()
        };
        let est_tokens = check_tokens("est_tokens", est_tokens);
        let within = if (*fcinfo).nargs > 3 {
            pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 3)
        } else {
            None
        };
        let within: Option<Vec<String>> = within.map(|w| {
            if w.len() > MAX_WITHIN {
                errors::invalid(format!("within lists at most {MAX_WITHIN} pools, not {}", w.len())).raise();
            }
            w.into_iter().flatten().collect()
        });
        let token = if (*fcinfo).nargs > 4 {
            match pgrx::fcinfo::pg_getarg::<&[u8]>(fcinfo, 4) {
                None => None,
                Some(digest) if digest.len() == 32 => Some(digest),
                Some(_) => errors::invalid("token_sha256 must be the 32 bytes of an API token's SHA-256").raise(),
            }
        } else {
            None
        };
        let (cfg, answer) = reserve(user, pool, est_tokens, (within.as_deref(), token));
        let row = result_row(&cfg, &answer);
        composite::form(fcinfo, &row)
    }
}
