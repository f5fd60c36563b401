//! A user's daily share on the hot path: taking one request of it, giving it back, and looking
//! at it without changing anything. The arithmetic is in shares.rs.
//!
//! Fast path: the user is cached, already reserved today and is within their share: one
//! member-stripe lock. A miss (the user is not cached): one lookup of their row, under no lock
//! (member_cache.rs). Slow path (first reservation of the day, or past the share): the pool's
//! lock too, to fix the day's share from the pool's aggregates or to borrow. None depends on the
//! number of users.

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::AnyNumeric;

use crate::catalog::config::{self};
use crate::catalog::grants::Privilege;
use crate::catalog::model::{Config, Pool};
use crate::engine::access::{self};
use crate::engine::args::check_user_id;
use crate::engine::budgets;
use crate::engine::member_cache;
use crate::errors;
use crate::policy::shares::{warning_level, Policy, PoolShares, NEVER, WEIGHT_SCALE};
use crate::state::clock;
use crate::state::members::{self, Member, FLAG_USE_DIRTY};
use crate::state::shmem;
use crate::state::shmem::Shared;

/// The ticket index of a request taken from the pool's shared guest allowance.
pub const UNTRACKED: u32 = u32::MAX - 1;

/// What a granted request holds of the user's share, to give it back if the request is not
/// made after all.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    pub index: u32,
    pub hash: u64,
    pub day: i32,
    pub borrowed: bool,
}

/// The user's share as a reservation result shows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Allocation {
    /// `None`: the pool's daily capacity is unlimited.
    pub allocated: Option<u64>,
    pub used: u64,
}

impl Allocation {
    pub fn remaining(&self) -> Option<u64> {
        self.allocated.map(|a| a.saturating_sub(self.used))
    }

    pub fn warning(&self) -> &'static str {
        match self.allocated {
            None => "ok",
            Some(a) => warning_level(a.saturating_sub(self.used), a),
        }
    }
}

pub enum Take {
    /// Within the share (or borrowing); `preferred` is the user's assigned key (0: none).
    Granted {
        ticket: Option<Ticket>,
        preferred: i64,
        allocation: Allocation,
    },
    /// The share is used up; the day resets in `retry_after_ms`.
    Exceeded {
        allocation: Allocation,
        retry_after_ms: i64,
    },
}

fn assigned_key(m: &Member) -> i64 {
    if m.is_member() {
        m.key_id
    } else {
        0
    }
}

/// Takes one request of `user`'s share in `pool` today.
pub fn take(sh: &Shared, cfg: &Config, pool: &Pool, user: &str, now_ms: i64) -> Take {
    let policy = pool.policy;
    let (today, _, day_end) = pool.day(now_ms);
    let hash = members::user_hash(cfg.owner.instance, pool.id, user);
    let now_min = members::minute(clock::real_now_ms());

    // Fast path: cached, active today and within the share (or no shares at all).
    let cached = {
        let stripe = sh.members.stripe(hash);
        match stripe.find(hash, pool.slot) {
            Some(i) => {
                let m = stripe.at(i);
                m.touched = now_min;
                stripe.stats.hits.store(stripe.stats.hits.load(Relaxed) + 1, Relaxed);
                if policy.capacity.is_none() {
                    members::seen(m, today);
                    return Take::Granted {
                        ticket: None,
                        preferred: assigned_key(m),
                        allocation: Allocation::default(),
                    };
                }
                if m.day == today && m.used < m.share {
                    m.used += 1;
                    m.flags |= FLAG_USE_DIRTY;
                    return Take::Granted {
                        ticket: Some(Ticket {
                            index: stripe.index_of(i),
                            hash,
                            day: today,
                            borrowed: false,
                        }),
                        preferred: assigned_key(m),
                        allocation: Allocation {
                            allocated: Some(m.share),
                            used: m.used,
                        },
                    };
                }
                true
            }
            None => false,
        }
    };
    // Slow path: fix today's share, or borrow. A user the cache does not hold is read from the
    // table under no lock (their first reservation since they were cached); read again when an
    // entry found above was evicted meanwhile, or a change of their membership raced the read.
    let mut read = (!cached).then(|| member_cache::Read::new(sh, cfg, pool, (user, hash)));
    let mut attempts = 0;
    let (mut shares, stripe, entry) = loop {
        let mut shares = sh.pool(pool.slot).lock();
        shares.roll(today);
        let stripe = sh.members.stripe(hash);
        let entry = match (stripe.find(hash, pool.slot), &read) {
            (Some(i), _) => Some(i),
            (None, Some(r)) if attempts >= member_cache::RETRIES || !r.raced(sh, hash) => {
                match (r.stored, policy.capacity) {
                    (Some(s), _) => {
                        let cached =
                            member_cache::cache(sh, &mut shares, &stripe, (pool.slot, hash), &s, today, now_min);
                        if cached.is_none() {
                            drop(stripe);
                            return uncached_member(sh, pool, &mut shares, &s, today, now_ms, day_end);
                        }
                        cached
                    }
                    // A guest of a pool without shares: nothing to count, but remembered as not
                    // a member, so that their next reservations do not read the table again
                    // (a signup makes the entry a member's, assign.rs).
                    (None, None) => stripe
                        .find_or_insert_guest(hash, pool.slot, today, now_min)
                        .inspect(|&i| members::seen(stripe.at(i), today)),
                    (None, Some(_)) => stripe.find_or_insert_guest(hash, pool.slot, today, now_min),
                }
            }
            _ => {
                drop(stripe);
                drop(shares);
                attempts += 1;
                read = Some(member_cache::Read::new(sh, cfg, pool, (user, hash)));
                continue;
            }
        };
        break (shares, stripe, entry);
    };
    if policy.capacity.is_none() {
        return Take::Granted {
            ticket: None,
            preferred: entry.map_or(0, |i| assigned_key(stripe.at(i))),
            allocation: Allocation::default(),
        };
    }
    let Some(i) = entry else {
        // A guest the member cache has no room for: the pool's guests share one allowance.
        drop(stripe);
        return untracked_guest(sh, pool, &shares, today, now_ms, day_end);
    };
    let m = stripe.at(i);
    m.touched = now_min;
    if m.day != today {
        let share = members::activate(&mut shares, &policy, m, today);
        // Only members' shares are promised; a guest's share limits only the guest.
        if m.is_member() {
            shares.active_shares = shares.active_shares.saturating_add(share);
        }
    }
    let ticket = |borrowed| {
        Some(Ticket {
            index: stripe.index_of(i),
            hash,
            day: today,
            borrowed,
        })
    };
    if m.used < m.share {
        m.used += 1;
        m.flags |= FLAG_USE_DIRTY;
        return Take::Granted {
            ticket: ticket(false),
            preferred: assigned_key(m),
            allocation: Allocation {
                allocated: Some(m.share),
                used: m.used,
            },
        };
    }
    if policy.borrowing && shares.lendable(&policy, today) >= 1 {
        m.used += 1;
        m.flags |= FLAG_USE_DIRTY;
        shares.borrowed += 1;
        return Take::Granted {
            ticket: ticket(true),
            preferred: assigned_key(m),
            allocation: Allocation {
                allocated: Some(m.share),
                used: m.used,
            },
        };
    }
    Take::Exceeded {
        allocation: Allocation {
            allocated: Some(m.share),
            used: m.used,
        },
        retry_after_ms: (day_end - now_ms).max(1),
    }
}

/// A member the cache has no clean entry for (a cache far too small for the load; a flush has
/// been asked for): served by what the table says they used of their share, which this request
/// does not add to; the pool counts it with its untracked requests, so borrowing sees it.
fn uncached_member(
    sh: &Shared,
    pool: &Pool,
    shares: &mut PoolShares,
    stored: &member_cache::Stored,
    today: i32,
    now_ms: i64,
    day_end: i64,
) -> Take {
    let policy = pool.policy;
    if policy.capacity.is_none() {
        return Take::Granted {
            ticket: None,
            preferred: stored.key_id,
            allocation: Allocation::default(),
        };
    }
    let (share, used) = if stored.used_on == today {
        (stored.share, stored.used)
    } else {
        let weight = shares
            .class_of(stored.weight_milli)
            .map_or(WEIGHT_SCALE, |c| shares.classes[c as usize].weight_milli);
        let counted = shares.counted_weight(today, policy.window_days);
        (PoolShares::share(&policy, weight, counted).unwrap_or(0), 0)
    };
    let allocation = Allocation {
        allocated: Some(share),
        used: used + 1,
    };
    if used >= share {
        return Take::Exceeded {
            allocation: Allocation { used, ..allocation },
            retry_after_ms: (day_end - now_ms).max(1),
        };
    }
    sh.pool(pool.slot).guests_add(today, 1);
    Take::Granted {
        ticket: Some(Ticket {
            index: UNTRACKED,
            hash: 0,
            day: today,
            borrowed: false,
        }),
        preferred: stored.key_id,
        allocation,
    }
}

/// The shared allowance of the guests that cannot be tracked one by one: the share one more
/// guest would get.
fn guest_allowance(policy: &Policy, shares: &PoolShares, today: i32) -> u64 {
    let counted = shares.counted_weight(today, policy.window_days);
    PoolShares::share(policy, WEIGHT_SCALE, counted + WEIGHT_SCALE).unwrap_or(0)
}

/// Takes one request of the pool's shared guest allowance.
fn untracked_guest(sh: &Shared, pool: &Pool, shares: &PoolShares, today: i32, now_ms: i64, day_end: i64) -> Take {
    let allowance = guest_allowance(&pool.policy, shares, today);
    let slot = sh.pool(pool.slot);
    match slot.guests_take(today, allowance) {
        Some(used) => {
            sh.header
                .guests_untracked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Take::Granted {
                ticket: Some(Ticket {
                    index: UNTRACKED,
                    hash: 0,
                    day: today,
                    borrowed: false,
                }),
                preferred: 0,
                allocation: Allocation {
                    allocated: Some(allowance),
                    used,
                },
            }
        }
        None => Take::Exceeded {
            allocation: Allocation {
                allocated: Some(allowance),
                used: slot.guests_used(today),
            },
            retry_after_ms: (day_end - now_ms).max(1),
        },
    }
}

/// Gives back what `ticket` took (the request was refused after all, or released).
pub fn give_back(sh: &Shared, pool_slot: u32, ticket: &Ticket) {
    if ticket.index == UNTRACKED {
        sh.pool(pool_slot).guests_give_back(ticket.day);
        return;
    }
    let shares = ticket.borrowed.then(|| sh.pool(pool_slot).lock());
    let stripe = sh.members.stripe(ticket.hash);
    if let Some(i) = stripe.position_of(ticket.index) {
        let m = stripe.at(i);
        if m.hash == ticket.hash && m.pool_slot == pool_slot && m.day == ticket.day && m.used > 0 {
            m.used -= 1;
            m.flags |= FLAG_USE_DIRTY;
        }
    }
    drop(stripe);
    if let Some(mut shares) = shares {
        if shares.day == ticket.day && shares.borrowed > 0 {
            shares.borrowed -= 1;
        }
    }
}

/// The user's share as it stands, without changing anything: `(allocation, may borrow,
/// resets at)`.
pub fn view(sh: &Shared, cfg: &Config, pool: &Pool, user: &str, now_ms: i64) -> (Allocation, bool, i64) {
    let policy = pool.policy;
    let (today, _, day_end) = pool.day(now_ms);
    let hash = members::user_hash(cfg.owner.instance, pool.id, user);
    if policy.capacity.is_none() {
        return (Allocation::default(), false, day_end);
    }
    let mut shares = *sh.pool(pool.slot).lock();
    shares.roll(today);
    let entry = member_cache::peek(sh, cfg, pool, (user, hash), &mut shares, today);
    let room = entry.is_some() || sh.members.stripe(hash).has_guest_room(hash, today);
    let allocation = match entry {
        Some(m) if m.day == today => Allocation {
            allocated: Some(m.share),
            used: m.used,
        },
        // No room to track this guest: it shares the pool's guest allowance.
        None if !room => Allocation {
            allocated: Some(guest_allowance(&policy, &shares, today)),
            used: sh.pool(pool.slot).guests_used(today),
        },
        other => {
            // What the first reservation of today would fix.
            let mut m = other.unwrap_or(Member {
                last_active: NEVER,
                day: NEVER,
                ..Default::default()
            });
            let share = members::activate(&mut shares, &policy, &mut m, today);
            Allocation {
                allocated: Some(share),
                used: 0,
            }
        }
    };
    let may_borrow = policy.borrowing && shares.lendable(&policy, today) >= 1;
    (allocation, may_borrow, day_end)
}

/// `keypool_allocation`: the user's share of the pool today (and, in pools that limit it, of
/// the minute), without changing anything.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn keypool_allocation(
    user_id: Option<&str>,
    pool: default!(Option<&str>, "'default'"),
) -> TableIterator<
    'static,
    (
        name!(allocated_today, Option<i64>),
        name!(used_today, i64),
        name!(remaining_today, Option<i64>),
        name!(warning_level, String),
        name!(resets_at, TimestampWithTimeZone),
        name!(allocated_tokens_today, Option<i64>),
        name!(spent, Option<AnyNumeric>),
        name!(budget, Option<AnyNumeric>),
        name!(budget_resets_at, Option<TimestampWithTimeZone>),
        name!(own_keys_requests_today, Option<i64>),
        name!(requests_this_minute, Option<i64>),
        name!(minute_request_limit, Option<i64>),
        name!(tokens_this_minute, Option<i64>),
        name!(minute_token_limit, Option<i64>),
        name!(open_reservations, Option<i32>),
    ),
> {
    let _path = crate::catalog::privilege::pin_search_path();
    let (cfg, pool_name, user) = arguments(user_id, pool);
    let sh = shmem::shared();
    let pool = access::pool(&cfg, pool_name, Privilege::Use);
    crate::engine::member_load::ensure_loaded(sh, &cfg, pool);
    let now = clock::now_ms();
    let (a, _, resets_at) = view(sh, &cfg, pool, user, now);
    let tokens = token_share(sh, &cfg, pool, user, now);
    let money = |m: u64| crate::policy::money::to_decimal(m).parse::<AnyNumeric>().ok();
    let (spent, budget, budget_resets_at) = match &pool.budget {
        Some(b) => {
            let s = budgets::standing(sh, &cfg, pool, b, user, now);
            (
                money(s.user_spent),
                b.per_user.and_then(money),
                Some(clock::to_timestamptz(s.resets_at_ms)),
            )
        }
        None => (None, None, None),
    };
    // The user's own keys (bring your own key): their use today, apart from the share.
    let own = pool.owned.get(user).map(|tiers| {
        let mut scopes: Vec<usize> = tiers
            .iter()
            .flat_map(|t| t.keys.iter())
            .map(|&k| cfg.keys[k].scope)
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        scopes
            .iter()
            .map(|&s| {
                let scope = &cfg.scopes[s];
                let w = sh.scope(scope.slot).lock();
                if w.tag().is(cfg.owner, scope.id) {
                    w.usage(now).2 as i64
                } else {
                    0
                }
            })
            .sum::<i64>()
    });
    // Their minute, in pools that limit it (engine/minute.rs).
    let hash = members::user_hash(cfg.owner.instance, pool.id, user);
    let minute = crate::engine::minute::standing(sh, pool, hash, now);
    let m = minute.as_ref();
    TableIterator::once((
        a.allocated.map(|v| v as i64),
        a.used as i64,
        a.remaining().map(|v| v as i64),
        a.warning().to_string(),
        clock::to_timestamptz(resets_at),
        tokens.map(|v| v as i64),
        spent,
        budget,
        budget_resets_at,
        own,
        m.map(|m| m.requests as i64),
        m.and_then(|m| m.request_limit).map(|v| v as i64),
        m.map(|m| m.tokens as i64),
        m.and_then(|m| m.token_limit).map(|v| v as i64),
        m.and_then(|m| m.open).map(|v| v as i32),
    ))
}

/// `keypool_can_request`: whether a reservation by this user would now pass the quota check
/// (within the share, or by borrowing) and the pool has a usable key. Changes nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_can_request(user_id: Option<&str>, pool: default!(Option<&str>, "'default'")) -> bool {
    let _path = crate::catalog::privilege::pin_search_path();
    let (cfg, pool_name, user) = arguments(user_id, pool);
    let sh = shmem::shared();
    let pool = access::pool(&cfg, pool_name, Privilege::Use);
    if !pool.keys.iter().any(|&k| cfg.usable(&cfg.keys[k])) {
        return false;
    }
    crate::engine::member_load::ensure_loaded(sh, &cfg, pool);
    let now = clock::now_ms();
    let (a, may_borrow, _) = view(sh, &cfg, pool, user, now);
    let within_budget = pool
        .budget
        .is_none_or(|b| budgets::standing(sh, &cfg, pool, &b, user, now).room);
    (a.remaining().is_none_or(|r| r > 0) || may_borrow) && within_budget
}

fn arguments<'a>(user_id: Option<&'a str>, pool: Option<&'a str>) -> (Rc<Config>, &'a str, &'a str) {
    let user = check_user_id(user_id);
    let Some(pool) = pool else {
        errors::null_argument("pool").raise()
    };
    (config::current(), pool, user)
}

/// The user's share of the pool's tokens per day, where every usable scope has such a limit.
fn token_share(sh: &Shared, cfg: &Config, pool: &Pool, user: &str, now_ms: i64) -> Option<u64> {
    let capacity = pool.token_capacity?;
    let token_policy = Policy {
        capacity: Some(capacity),
        min_share: 0,
        ..pool.policy
    };
    let (today, _, _) = pool.day(now_ms);
    let hash = members::user_hash(cfg.owner.instance, pool.id, user);
    let mut shares = *sh.pool(pool.slot).lock();
    shares.roll(today);
    let m = member_cache::peek(sh, cfg, pool, (user, hash), &mut shares, today);
    let mut m = m.unwrap_or(Member {
        last_active: NEVER,
        day: NEVER,
        ..Default::default()
    });
    m.day = NEVER;
    Some(members::activate(&mut shares, &token_policy, &mut m, today))
}
