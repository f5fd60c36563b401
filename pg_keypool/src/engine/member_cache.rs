//! Members the shared-memory cache (members.rs) does not hold: read from `keypool.member` on a
//! user's first reservation (one indexed lookup, never under a lock), then put in the cache.
//!
//! A lookup can race with a transaction that changes the same user's membership (a signup, a
//! move, a new weight): that transaction bumps its stripe's epoch when it ends, and a lookup
//! whose stripe epoch moved while it ran is done again before anything is cached.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::LazyLock;

use pgrx::prelude::*;
use pgrx::{pg_sys, IntoDatum};

use crate::catalog::model::{Config, Pool};
use crate::catalog::privilege;
use crate::errors;
use crate::policy::shares::{PoolShares, NEVER, WEIGHT_SCALE};
use crate::state::members::{self, Member, Stripe, FLAG_MEMBER};
use crate::state::shmem::Shared;

/// Reads done again at most this often when membership keeps changing under them.
pub const RETRIES: usize = 4;

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

impl Stored {
    /// From the columns of [`STORED_COLUMNS`], in order.
    pub fn from_columns(
        key_id: i64,
        weight_milli: i64,
        last_active: i32,
        used_on: i32,
        used: i64,
        share: i64,
    ) -> Stored {
        Stored {
            key_id,
            weight_milli: weight_milli.max(1),
            last_active,
            used_on,
            used: used.max(0) as u64,
            share: share.max(0) as u64,
        }
    }
}

/// The columns of `keypool.member m` a [`Stored`] is made of (never NULL): key (0: none),
/// weight in thousandths, last active day, day of `used`, used, share.
pub static STORED_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "coalesce(m.key_id, 0), round(m.weight * {WEIGHT_SCALE})::bigint,
         coalesce(m.last_active - DATE '1970-01-01', {NEVER}),
         coalesce(m.used_on - DATE '1970-01-01', {NEVER}), coalesce(m.used, 0), coalesce(m.share, 0)"
    )
});

thread_local! {
    static LOOKUP: crate::catalog::query::KeptPlan = const { crate::catalog::query::KeptPlan::new() };
}

/// The user's row of the pool's members, if they are a member: by the primary key, with the
/// latest snapshot (a transaction's older snapshot would miss recent signups), with a plan
/// prepared once per backend.
pub fn lookup(cfg: &Config, pool: &Pool, user: &str) -> Option<Stored> {
    static SQL: LazyLock<CString> = LazyLock::new(|| {
        CString::new(format!(
            "SELECT {} FROM keypool.member m WHERE m.pool_id = $1 AND m.user_id = $2",
            *STORED_COLUMNS
        ))
        .expect("no NUL in the query")
    });
    let user = user.into_datum()?;
    privilege::as_owner(cfg.extension_owner, || {
        Spi::connect(|_| {
            LOOKUP.with(|kept| {
                crate::catalog::query::fresh_rows_kept(
                    kept,
                    &SQL,
                    &mut [pg_sys::INT8OID, pg_sys::TEXTOID],
                    &mut [pg_sys::Datum::from(pool.id), user],
                    |r| Stored::from_columns(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)),
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
        stripe.find(hash, pool.slot).map(|i| *stripe.at(i))
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

/// A user's row as read after a miss, and the stripe's epoch before the read.
pub struct Read {
    epoch: u64,
    /// `None`: not a member (a guest).
    pub stored: Option<Stored>,
}

impl Read {
    /// Reads the user from the table (never under a lock).
    pub fn new(sh: &Shared, cfg: &Config, pool: &Pool, (user, hash): (&str, u64)) -> Read {
        let epoch = sh.members.stats_of(hash).epoch.load(Ordering::Acquire);
        Read {
            epoch,
            stored: lookup(cfg, pool, user),
        }
    }

    /// Whether a change of the user's membership ended while the read ran (read again).
    pub fn raced(&self, sh: &Shared, hash: u64) -> bool {
        sh.members.stats_of(hash).epoch.load(Ordering::Acquire) != self.epoch
    }
}

/// Caches a member read from the table, with the pool and the user's stripe locked; `None`
/// when every entry of their window holds use not flushed yet (counted; a flush is asked for).
pub fn cache(
    sh: &Shared,
    shares: &mut PoolShares,
    stripe: &Stripe<'_>,
    (pool_slot, hash): (u32, u64),
    s: &Stored,
    today: i32,
    now_min: u16,
) -> Option<usize> {
    let Some(i) = stripe.insert_member(hash, pool_slot, today, now_min) else {
        stripe.stats.uncached.fetch_add(1, Ordering::Relaxed);
        sh.header.flush_wanted.store(1, Ordering::Release);
        return None;
    };
    fill(shares, stripe.at(i), s, today);
    stripe.stats.loads.fetch_add(1, Ordering::Relaxed);
    Some(i)
}

pub fn as_owner<R>(cfg: &Config, f: impl FnOnce(&mut pgrx::spi::SpiClient<'_>) -> R) -> R {
    privilege::spi_as_owner(cfg.extension_owner, f)
}

pub fn rows<T>(
    table: pgrx::spi::SpiTupleTable<'_>,
    mut f: impl FnMut(&pgrx::spi::SpiHeapTupleData<'_>) -> T,
) -> Vec<T> {
    table.map(|row| f(&row)).collect()
}

/// The rows of the given users of the pool (by user id), by their hashes.
pub fn stored_by_user(cfg: &Config, pool: &Pool, users: &[String], hashes: &[u64]) -> HashMap<u64, Stored> {
    let hash_of: HashMap<&str, u64> = users.iter().map(|u| u.as_str()).zip(hashes.iter().copied()).collect();
    as_owner(cfg, |client| {
        let t = errors::spi(client.select(
            // A join with the ids (one index probe each), not `= ANY`: during a backfill the table
            // grows within the transaction and a scan of it per batch would be quadratic.
            &format!(
                "SELECT m.user_id, {} FROM unnest($2::text[]) AS u(id)
                   JOIN keypool.member m ON m.pool_id = $1 AND m.user_id = u.id",
                *STORED_COLUMNS
            ),
            None,
            &[pool.id.into(), users.to_vec().into()],
        ));
        rows(t, |r| {
            let user = r.get::<String>(1).ok().flatten().unwrap_or_default();
            (user, stored_of(r, 2))
        })
        .into_iter()
        .filter_map(|(u, s)| Some((*hash_of.get(u.as_str())?, s)))
        .collect()
    })
}

/// A `Stored` from `STORED_COLUMNS` at columns `first..first + 6` of a row.
fn stored_of(r: &pgrx::spi::SpiHeapTupleData<'_>, first: usize) -> Stored {
    let get = |i: usize| r.get::<i64>(first + i).ok().flatten().unwrap_or(0);
    let day = |i: usize| r.get::<i32>(first + i).ok().flatten().unwrap_or(NEVER);
    Stored::from_columns(get(0), get(1), day(2), day(3), get(4), get(5))
}

/// The table's rows of the given users of the pool.
pub fn stored_members(cfg: &Config, pool: &Pool, hashes: &[u64]) -> HashMap<u64, Stored> {
    if hashes.is_empty() {
        return HashMap::new();
    }
    let sql_hashes: Vec<i64> = hashes.iter().map(|&h| members::hash_to_sql(h)).collect();
    // Few: an index probe each; many (a cache restored after a clean shutdown): one scan with a
    // hashed list.
    let from = if hashes.len() <= 20_000 {
        "FROM unnest($2::bigint[]) AS u(h) JOIN keypool.member m ON m.pool_id = $1 AND m.user_hash = u.h"
    } else {
        "FROM keypool.member m WHERE m.pool_id = $1 AND m.user_hash = ANY($2)"
    };
    as_owner(cfg, |client| {
        let t = errors::spi(client.select(
            &format!("SELECT m.user_hash, {} {from}", *STORED_COLUMNS),
            None,
            &[pool.id.into(), sql_hashes.into()],
        ));
        rows(t, |r| {
            let hash = members::hash_from_sql(r.get::<i64>(1).ok().flatten().unwrap_or(0));
            (hash, stored_of(r, 2))
        })
        .into_iter()
        .collect()
    })
}
