//! Spend budgets (`keypool_set_budget`): a pool's spend per day or month, and each user's, in
//! millionths of the currency of `keypool_prices`.
//!
//! Money is integer millionths throughout, never floating point: a model's prices are loaded
//! rounded up to the millionth (config.rs), a call's cost is rounded up to the millionth, so a
//! cost is never undercounted and 100 × 0.01 is exactly 1.00.
//!
//! A reservation holds its estimated cost like it holds tokens: `per_request` plus `est_tokens`
//! at the dearer of the input and output price (the worst case), or the pool's default cost
//! when the caller gave no estimate. The hold is taken from the pool's spend and the user's
//! under a lock before any key is tried, for the dearest usable key of the pool, and lowered to
//! the granted key's estimate at once; so concurrent reservations never exceed a budget.
//! Settling replaces the hold by the call's true cost; releasing gives it back; an expired
//! reservation keeps it. A cost counts in the period it was reserved in.
//!
//! The pool's spend lives in its shared-memory slot; each user's in their member entry (guests
//! get an entry of their own while there is room; a user with none cannot be tracked and is
//! refused under a per-user budget). Both are written to `keypool.pool_spend` and
//! `keypool.member` by the flusher and saved in the state file, and restored from them.

use crate::catalog::model::{Config, Key, Pool};
use crate::errors::{self, Code};
use crate::policy::money::{estimate, period, Budget, Price};
use crate::state::members::{self, FLAG_SPEND_DIRTY, STRIPES};
use crate::state::reservation::Hold;
use crate::state::shmem::Shared;

/// What `keypool.user_spend` says the user spent in the period that began on `start`, when
/// shared memory does not know that period for them (their first reservation of it since a
/// restart, or since their entry was taken over): one indexed lookup. Never under a lock.
pub fn recorded_user_spend(sh: &Shared, cfg: &Config, pool: &Pool, hash: u64, start: i32) -> Option<u64> {
    let known = {
        let stripe = sh.members.stripe(hash);
        stripe
            .find(hash, pool.slot)
            .is_some_and(|i| stripe.at(i).spent_from == start)
    };
    if known {
        return None;
    }
    let sql = std::ffi::CString::new(format!(
        "SELECT spent FROM keypool.user_spend
          WHERE pool_id = {} AND user_hash = {} AND period_start - DATE '1970-01-01' = {start}",
        pool.id,
        members::hash_to_sql(hash)
    ))
    .expect("no NUL in the query");
    crate::catalog::privilege::as_owner(cfg.extension_owner, || {
        pgrx::Spi::connect(|_| crate::catalog::query::fresh_rows(&sql, |r| r.get::<i64>(0)))
    })
    .into_iter()
    .next()
    .map(|v| v.max(0) as u64)
}

/// Writes what users spent (entries changed since the last flush) to `keypool.user_spend`;
/// the entries are marked clean when the transaction commits, if they did not change.
pub fn flush_user_spend(sh: &'static Shared, cfg: &Config) {
    let pools: std::collections::HashMap<u32, (i64, u32)> = cfg
        .pools
        .iter()
        .filter(|p| p.budget.is_some_and(|b| b.per_user.is_some()))
        .map(|p| {
            (
                p.slot,
                (
                    p.id,
                    sh.pool(p.slot).members_gen.load(std::sync::atomic::Ordering::Acquire),
                ),
            )
        })
        .collect();
    if pools.is_empty() {
        return;
    }
    let (mut pool_ids, mut hashes, mut starts, mut spent) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut written: Vec<(u32, u64, i32, u64)> = Vec::new();
    for s in 0..STRIPES {
        let stripe = sh.members.stripe_at(s);
        for i in 0..stripe.len() {
            let m = stripe.at(i);
            if m.hash == 0 || m.flags & FLAG_SPEND_DIRTY == 0 || m.spent_from == 0 {
                continue;
            }
            if let Some(&(pool_id, gen)) = pools.get(&m.pool_slot) {
                if gen == m.pool_gen {
                    pool_ids.push(pool_id);
                    hashes.push(members::hash_to_sql(m.hash));
                    starts.push(m.spent_from);
                    spent.push(m.spent.min(i64::MAX as u64) as i64);
                    written.push((stripe.index_of(i), m.hash, m.spent_from, m.spent));
                }
            }
        }
    }
    if written.is_empty() {
        return;
    }
    crate::catalog::privilege::as_owner(cfg.extension_owner, || {
        pgrx::Spi::connect_mut(|client| {
            errors::spi(client.update(
                "INSERT INTO keypool.user_spend AS u (pool_id, user_hash, period_start, spent)
                 SELECT v.p, v.h, DATE '1970-01-01' + v.d, v.s
                   FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::bigint[]) AS v(p, h, d, s)
                  WHERE EXISTS (SELECT 1 FROM keypool.pool p WHERE p.id = v.p)
                 ON CONFLICT (pool_id, user_hash) DO UPDATE
                    SET period_start = excluded.period_start, spent = excluded.spent",
                None,
                &[pool_ids.into(), hashes.into(), starts.into(), spent.into()],
            ));
        })
    });
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        let Some(sh) = crate::state::shmem::try_shared() else {
            return;
        };
        for (index, hash, start, spent) in &written {
            let stripe = sh.members.stripe(*hash);
            if let Some(i) = stripe.position_of(*index) {
                let m = stripe.at(i);
                if m.hash == *hash && m.spent_from == *start && m.spent == *spent {
                    m.flags &= !FLAG_SPEND_DIRTY;
                }
            }
        }
    });
}

/// A key of a pool with a budget must have a price.
pub fn price_of(key: &Key, pool: &Pool) -> Price {
    match key.price {
        Some(p) => p,
        None => errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "key {} ({}) of pool \"{}\" has no price, and the pool has a budget: set one with keypool_set_price",
                key.id, key.label, pool.name
            ),
        )
        .detail(format!(
            "A budget holds each reservation's cost, from the price of provider \"{}\" model \"{}\".",
            key.provider,
            key.model.as_deref().unwrap_or("")
        ))
        .hint(format!(
            "SELECT keypool_set_price('{}', {}, <input per million>, <output per million>);",
            key.provider,
            key.model.as_deref().map_or("NULL".to_string(), |m| format!("'{m}'"))
        ))
        .raise(),
    }
}

/// The most a reservation in `pool` could hold: the estimate on its dearest usable key.
pub fn worst_estimate(cfg: &Config, pool: &Pool, budget: &Budget, est_tokens: u64) -> u64 {
    pool.keys
        .iter()
        .map(|&k| &cfg.keys[k])
        .filter(|k| cfg.usable(k))
        .map(|k| estimate(&price_of(k, pool), est_tokens, budget.default_cost))
        .max()
        .unwrap_or(0)
}

/// Takes `amount` of the pool's budget and of the user's (`hash`) for the period containing
/// `now_ms`: the hold, or the wait until the period ends.
/// `recorded` is what `recorded_user_spend` found, if it was asked.
pub fn take(
    sh: &Shared,
    pool: &Pool,
    budget: &Budget,
    (hash, recorded): (u64, Option<u64>),
    amount: u64,
    now_ms: i64,
) -> Result<Hold, i64> {
    let (start, end) = period(budget, pool.tz, now_ms);
    let wait = (end - now_ms).max(1);
    // The pool's spend is kept whether or not it has a limit of its own (views show it).
    let taken = sh.pool(pool.slot).spend.with(|p, spent| {
        if *p != start {
            *p = start;
            *spent = 0;
        }
        // A hold of nothing still needs room: the call will cost something.
        if budget
            .limit
            .is_some_and(|limit| spent.saturating_add(amount.max(1)) > limit)
        {
            return false;
        }
        *spent = spent.saturating_add(amount);
        true
    });
    if !taken {
        return Err(wait);
    }
    let mut hold = Hold {
        amount,
        period: start,
        index: Hold::NONE_INDEX,
        hash,
    };
    if let Some(per_user) = budget.per_user {
        let today = pool.day(now_ms).0;
        let stripe = sh.members.stripe(hash);
        let entry = stripe.find(hash, pool.slot).or_else(|| {
            let now_min = members::minute(crate::state::clock::real_now_ms());
            stripe.find_or_insert_guest(hash, pool.slot, today, now_min)
        });
        let fits = entry.is_some_and(|i| {
            let m = stripe.at(i);
            if m.spent_from != start {
                m.spent_from = start;
                m.spent = recorded.unwrap_or(0);
            }
            if m.spent.saturating_add(amount.max(1)) > per_user {
                return false;
            }
            m.spent += amount;
            m.flags |= FLAG_SPEND_DIRTY;
            hold.index = stripe.index_of(i);
            true
        });
        drop(stripe);
        if !fits {
            // Only the pool's part was taken (hold.index is still none).
            adjust(sh, pool.slot, &hold, -(amount as i64));
            return Err(wait);
        }
    }
    Ok(hold)
}

/// Changes what a hold counts by `delta` (settling: the true cost less the estimate; releasing:
/// minus the estimate), in the pool's spend and the user's, if still in the same period.
pub fn adjust(sh: &Shared, pool_slot: u32, hold: &Hold, delta: i64) {
    if delta == 0 {
        return;
    }
    let apply = |spent: &mut u64| {
        *spent = if delta < 0 {
            spent.saturating_sub(delta.unsigned_abs())
        } else {
            spent.saturating_add(delta as u64)
        };
    };
    sh.pool(pool_slot).spend.with(|p, spent| {
        if *p == hold.period {
            apply(spent);
        }
    });
    if hold.index != Hold::NONE_INDEX {
        let stripe = sh.members.stripe(hold.hash);
        if let Some(i) = stripe.position_of(hold.index) {
            let m = stripe.at(i);
            if m.hash == hold.hash && m.pool_slot == pool_slot && m.spent_from == hold.period {
                apply(&mut m.spent);
                m.flags |= FLAG_SPEND_DIRTY;
            }
        }
    }
}

/// Where a user stands against a pool's budget in the current period (changes nothing).
pub struct Standing {
    /// The user's spend.
    pub user_spent: u64,
    /// When the period ends.
    pub resets_at_ms: i64,
    /// Whether a reservation without a token estimate would fit both budgets now.
    pub room: bool,
}

pub fn standing(sh: &Shared, cfg: &Config, pool: &Pool, budget: &Budget, user: &str, now_ms: i64) -> Standing {
    let (start, end) = period(budget, pool.tz, now_ms);
    let hash = members::user_hash(cfg.owner.instance, pool.id, user);
    let recorded = budget
        .per_user
        .and_then(|_| recorded_user_spend(sh, cfg, pool, hash, start));
    let user_spent = {
        let stripe = sh.members.stripe(hash);
        stripe
            .find(hash, pool.slot)
            .map(|i| stripe.at(i))
            .filter(|m| m.spent_from == start)
            .map_or(recorded.unwrap_or(0), |m| m.spent)
    };
    let pool_spent = sh.pool(pool.slot).spend.of(start);
    let next = pool
        .keys
        .iter()
        .map(|&k| &cfg.keys[k])
        .filter(|k| cfg.usable(k))
        .filter_map(|k| k.price.map(|p| estimate(&p, 0, budget.default_cost)))
        .max()
        .unwrap_or(budget.default_cost);
    let next = next.max(1);
    let room = budget.limit.is_none_or(|l| pool_spent.saturating_add(next) <= l)
        && budget.per_user.is_none_or(|l| user_spent.saturating_add(next) <= l);
    Standing {
        user_spent,
        resets_at_ms: end,
        room,
    }
}

/// Restores what a pool spent in its current period from `keypool.pool_spend` (after a start,
/// a crash or a failover), unless shared memory knows more.
pub fn restore_pool_spend(sh: &Shared, cfg: &Config, pool: &Pool) {
    let Some(budget) = &pool.budget else {
        return;
    };
    let (start, _) = period(budget, pool.tz, crate::state::clock::now_ms());
    let sql = std::ffi::CString::new(format!(
        "SELECT spent FROM keypool.pool_spend WHERE pool_id = {} AND period_start - DATE '1970-01-01' = {start}",
        pool.id
    ))
    .expect("no NUL in the query");
    let recorded: Option<i64> = crate::catalog::privilege::as_owner(cfg.extension_owner, || {
        pgrx::Spi::connect(|_| crate::catalog::query::fresh_rows(&sql, |r| r.get::<i64>(0)))
    })
    .into_iter()
    .next();
    if let Some(recorded) = recorded {
        sh.pool(pool.slot).spend.with(|p, spent| {
            if *p != start {
                *p = start;
                *spent = 0;
            }
            *spent = (*spent).max(recorded.max(0) as u64);
        });
    }
}
