//! Members the shared-memory cache (members.rs) does not hold: read from `keypool.member` on a
//! user's first reservation (one indexed lookup, never under a lock), then put in the cache.
//!
//! A lookup can race with a transaction that changes the same user's membership (a signup, a
//! move, a new weight): that transaction bumps its stripe's epoch when it ends, and a lookup
//! whose stripe epoch moved while it ran is done again before anything is cached.

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::LazyLock;

use pgrx::prelude::*;
use pgrx::{pg_sys, IntoDatum};

use crate::config::{self, Config, Pool};
use crate::members::{self, Member, FLAG_MEMBER};
use crate::privilege;
use crate::shares::{PoolShares, NEVER, WEIGHT_SCALE};
use crate::shmem::Shared;

/// Lookups done again at most this often when membership keeps changing under them.
const RETRIES: usize = 4;

/// A member as `keypool.member` records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// 0: no key.
    pub key_id: i64,
    pub weight_milli: i64,
    /// Day numbers, or NEVER.
    pub last_active: i32,
    pub used_on: i32,
    pub used: u64,
    pub share: u64,
}

thread_local! {
    static LOOKUP: config::KeptPlan = const { config::KeptPlan::new() };
}

/// The user's row of the pool's members, if they are a member: by the primary key, with the
/// latest snapshot (a transaction's older snapshot would miss recent signups), with a plan
/// prepared once per backend.
pub fn lookup(cfg: &Config, pool: &Pool, user: &str) -> Option<Stored> {
    static SQL: LazyLock<CString> = LazyLock::new(|| {
        CString::new(format!(
            "SELECT coalesce(key_id, 0), round(weight * {WEIGHT_SCALE})::bigint,
                    coalesce(last_active - DATE '1970-01-01', {NEVER}),
                    coalesce(used_on - DATE '1970-01-01', {NEVER}), coalesce(used, 0), coalesce(share, 0)
               FROM keypool.member WHERE pool_id = $1 AND user_id = $2"
        ))
        .expect("no NUL in the query")
    });
    let user = user.into_datum()?;
    privilege::as_owner(cfg.extension_owner, || {
        Spi::connect(|_| {
            LOOKUP.with(|kept| {
                config::fresh_rows_kept(
                    kept,
                    &SQL,
                    &mut [pg_sys::INT8OID, pg_sys::TEXTOID],
                    &mut [pg_sys::Datum::from(pool.id), user],
                    |r| Stored {
                        key_id: r.get::<i64>(0),
                        weight_milli: r.get::<i64>(1).max(1),
                        last_active: r.get::<i32>(2),
                        used_on: r.get::<i32>(3),
                        used: r.get::<i64>(4).max(0) as u64,
                        share: r.get::<i64>(5).max(0) as u64,
                    },
                )
            })
        })
    })
    .into_iter()
    .next()
}

/// Writes a stored member into entry `m` (already bound to the user). Its share of today, if
/// it has one, is already counted in the pool's aggregates; so is its class and activity.
pub fn fill(shares: &mut PoolShares, m: &mut Member, s: &Stored, today: i32) {
    m.flags = FLAG_MEMBER | (m.flags & !FLAG_MEMBER);
    m.key_id = s.key_id;
    // The class exists (the member is counted in it); a weight changed since is found or made.
    m.class = shares.class_of(s.weight_milli).unwrap_or(0) as u8;
    m.last_active = s.last_active;
    if s.used_on == today {
        m.day = today;
        m.used = s.used;
        m.share = s.share;
    } else {
        m.day = NEVER;
        m.used = 0;
        m.share = 0;
    }
}

/// The user's entry as the cache would hold it, without caching it (views).
pub fn peek(
    sh: &Shared,
    cfg: &Config,
    pool: &Pool,
    (user, hash): (&str, u64),
    shares: &mut PoolShares,
    today: i32,
) -> Option<Member> {
    let cached = {
        let stripe = sh.members.stripe(hash);
        stripe.find(sh, hash, pool.slot).map(|i| *stripe.at(i))
    };
    cached.or_else(|| {
        let s = lookup(cfg, pool, user)?;
        let mut m = Member {
            hash,
            last_active: NEVER,
            day: NEVER,
            ..Default::default()
        };
        fill(shares, &mut m, &s, today);
        Some(m)
    })
}

/// What a miss found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// The user has an entry now (a member read from the table, or cached meanwhile).
    Cached,
    /// Not a member of the pool: a guest, cached by the caller if there is room.
    Guest,
    /// A member, but every entry of their window holds use not flushed yet (a flush is asked
    /// for at once): their row as the table has it.
    NoRoom(Stored),
}

/// After a miss: reads the user from the table and caches them if they are a member (the
/// caller then finds the entry).
pub fn load(sh: &Shared, cfg: &Config, pool: &Pool, (user, hash): (&str, u64), now_ms: i64) -> Loaded {
    let today = pool.day(now_ms).0;
    let stats = sh.members.stats_of(hash);
    for attempt in 0..RETRIES {
        let epoch = stats.epoch.load(Ordering::Acquire);
        let stored = lookup(cfg, pool, user);
        let mut shares = sh.pool(pool.slot).lock();
        shares.roll(today);
        let stripe = sh.members.stripe(hash);
        if stripe.find(sh, hash, pool.slot).is_some() {
            // Someone else cached the user meanwhile.
            return Loaded::Cached;
        }
        if stats.epoch.load(Ordering::Acquire) != epoch && attempt + 1 < RETRIES {
            continue;
        }
        let Some(s) = stored else {
            return Loaded::Guest;
        };
        let Some(i) = stripe.insert_member(sh, hash, pool.slot, today, members::minute(crate::clock::real_now_ms()))
        else {
            stats.uncached.fetch_add(1, Ordering::Relaxed);
            sh.header.flush_wanted.store(1, Ordering::Release);
            return Loaded::NoRoom(s);
        };
        fill(&mut shares, stripe.at(i), &s, today);
        stats.loads.fetch_add(1, Ordering::Relaxed);
        return Loaded::Cached;
    }
    Loaded::Guest
}
