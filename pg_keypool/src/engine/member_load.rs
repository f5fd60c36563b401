//! Counting a pool's members into shared memory: its aggregates (members per weight class and
//! day of last activity, shares fixed and borrowed today) and each key's count of members, with
//! one aggregate query over `keypool.member` when the pool is first used after a start, a crash
//! or a failover; entries the cache already holds are brought in line with the table.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::model::{Config, Pool};
use crate::catalog::privilege;
use crate::engine::member_cache;
use crate::errors::{self, Code};
use crate::policy::shares::{PoolShares, NEVER, WEIGHT_SCALE};
use crate::state::clock;
use crate::state::members::{self, FLAG_MEMBER};
use crate::state::shmem::Shared;
use crate::state::slots::{PoolSlot, MEMBERS_LOADING, MEMBERS_READY, MEMBERS_UNLOADED};

use crate::engine::member_cache::stored_members;

/// Makes sure the pool's members are in shared memory: loads them once after the server starts
/// (every other caller waits for the one loading).
pub fn ensure_loaded(sh: &'static Shared, cfg: &Config, pool: &Pool) {
    let slot = sh.pool(pool.slot);
    if slot.after_prepared.load(Acquire) != 0 {
        reload_after_prepared(slot);
    }
    let me = unsafe { pg_sys::MyProcPid };
    loop {
        match slot.members_state.load(Acquire) {
            MEMBERS_READY => return,
            MEMBERS_LOADING => {
                let pid = slot.loader_pid.load(Acquire);
                if pid == me || (pid != 0 && unsafe { libc::kill(pid, 0) } != 0) {
                    // Our own failed attempt, or a loader that died: start over.
                    let _ = slot
                        .members_state
                        .compare_exchange(MEMBERS_LOADING, MEMBERS_UNLOADED, AcqRel, Acquire);
                } else {
                    std::thread::sleep(Duration::from_millis(2));
                    pgrx::check_for_interrupts!();
                }
            }
            _ => {
                if slot
                    .members_state
                    .compare_exchange(MEMBERS_UNLOADED, MEMBERS_LOADING, AcqRel, Acquire)
                    .is_ok()
                {
                    slot.loader_pid.store(me, Release);
                    break;
                }
            }
        }
    }
    struct Loading(&'static PoolSlot, bool);
    impl Drop for Loading {
        fn drop(&mut self) {
            if !self.1 {
                self.0.members_gen.fetch_add(1, AcqRel);
                self.0.members_state.store(MEMBERS_UNLOADED, Release);
            }
        }
    }
    let mut loading = Loading(slot, false);
    load(sh, cfg, pool, slot);
    slot.members_state.store(MEMBERS_READY, Release);
    loading.1 = true;
}

/// A prepared transaction assigned or moved members of this pool: once none is left (committed
/// or rolled back), the members are read again from the table, which then says what happened.
/// Entries keep today's use; only membership, keys, weights and counts are rebuilt.
#[cold]
fn reload_after_prepared(slot: &PoolSlot) {
    let _path = privilege::pin_search_path();
    let none_left = Spi::get_one::<bool>(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE database OPERATOR(pg_catalog.=) pg_catalog.current_database())",
    );
    if matches!(none_left, Ok(Some(true)))
        && slot
            .members_state
            .compare_exchange(MEMBERS_READY, MEMBERS_UNLOADED, AcqRel, Acquire)
            .is_ok()
    {
        slot.after_prepared.store(0, Release);
    }
}

/// Loads the members of every pool of this database (views show users per key).
pub fn ensure_all_loaded(sh: &'static Shared, cfg: &Config) {
    for pool in &cfg.pools {
        ensure_loaded(sh, cfg, pool);
    }
}

/// Counts the pool's members into its aggregates (members per weight class and day of last
/// activity, shares fixed and borrowed today, members per key) with one aggregate query, and
/// brings the entries the cache already holds (restored from a clean shutdown, or kept across a
/// reload) in line with the table. Members themselves are cached on their first reservation.
pub fn load(sh: &'static Shared, cfg: &Config, pool: &Pool, slot: &PoolSlot) {
    if slot.aggregates_restored.swap(0, AcqRel) == 1 {
        // A clean restart: the aggregates, the keys' counts and the cached entries are as they
        // were at the shutdown, and the tables cannot have changed since.
        crate::engine::budgets::restore_pool_spend(sh, cfg, pool);
        return;
    }
    let today = pool.day(clock::now_ms()).0;
    // Grouped by the raw columns (cheapest per row); converted per group.
    let sql = CString::new(format!(
        "SELECT round(weight * {WEIGHT_SCALE})::bigint, coalesce(last_active - DATE '1970-01-01', {NEVER}),
                coalesce(key_id, 0), n, s::bigint, b::bigint
           FROM (SELECT weight, last_active, key_id, count(*) AS n,
                        coalesce(sum(share) FILTER (WHERE used_on = DATE '1970-01-01' + {today}), 0) AS s,
                        coalesce(sum(greatest(used - share, 0)) FILTER (WHERE used_on = DATE '1970-01-01' + {today}), 0) AS b
                   FROM keypool.member WHERE pool_id = {} GROUP BY weight, last_active, key_id) g",
        pool.id
    ))
    .expect("no NUL in the query");
    type Group = (i64, i32, i64, i64, i64, i64);
    let groups: Vec<Group> = privilege::as_owner(cfg.extension_owner, || {
        Spi::connect(|_| {
            crate::catalog::query::fresh_rows_parallel(&sql, |r| {
                (
                    r.get::<i64>(0),
                    r.get::<i32>(1),
                    r.get::<i64>(2),
                    r.get::<i64>(3),
                    r.get::<i64>(4),
                    r.get::<i64>(5),
                )
            })
        })
    });
    crate::engine::budgets::restore_pool_spend(sh, cfg, pool);
    let cached = cached_hashes(sh, pool.slot);
    let stored = stored_members(cfg, pool, &cached);
    let mut shares = slot.lock();
    *shares = PoolShares::default();
    shares.roll(today);
    let mut counts: HashMap<i64, i64> = HashMap::new();
    for (weight, last_active, key_id, n, shares_today, borrowed_today) in groups {
        let class = shares
            .class_of(weight.max(1))
            .unwrap_or_else(|| too_many_weights(&pool.name));
        shares.add_members(class, last_active, n);
        shares.active_shares += shares_today.max(0) as u64;
        shares.borrowed += borrowed_today.max(0) as u64;
        if key_id != 0 {
            *counts.entry(key_id).or_default() += n;
        }
    }
    // Entries already cached: the table says who is a member, on which key, with which
    // weight; an entry's use of today (from a clean shutdown) is newer than the table's.
    for hash in cached {
        let stripe = sh.members.stripe(hash);
        let Some(i) = stripe.find(hash, pool.slot) else {
            continue;
        };
        let m = stripe.at(i);
        let Some(s) = stored.get(&hash) else {
            m.flags &= !FLAG_MEMBER;
            m.key_id = 0;
            continue;
        };
        let entry = *m;
        member_cache::fill(&mut shares, m, s, today);
        if entry.last_active != NEVER && entry.last_active > s.last_active {
            shares.remove_member(u16::from(m.class), s.last_active);
            shares.add_member(u16::from(m.class), entry.last_active);
            m.last_active = entry.last_active;
        }
        if entry.day == today {
            if s.used_on == today {
                shares.active_shares = shares.active_shares.saturating_sub(s.share);
                shares.borrowed = shares.borrowed.saturating_sub(s.used.saturating_sub(s.share));
            }
            shares.active_shares += entry.share;
            shares.borrowed += entry.used.saturating_sub(entry.share);
            m.day = today;
            m.used = entry.used;
            m.share = entry.share;
        }
    }
    for &k in &pool.keys {
        let key = &cfg.keys[k];
        let ks = sh.key(key.slot);
        if ks.tag.is(cfg.owner, key.id) {
            ks.assigned.store(counts.get(&key.id).copied().unwrap_or(0), Release);
            ks.tree_build.store(0, Release);
        }
    }
}

/// Users the cache holds for the pool slot's current generation.
fn cached_hashes(sh: &Shared, pool_slot: u32) -> Vec<u64> {
    let gen = sh.pool(pool_slot).members_gen.load(Acquire);
    let mut out = Vec::new();
    for s in 0..members::STRIPES {
        let stripe = sh.members.stripe_at(s);
        for i in 0..stripe.len() {
            let m = stripe.at(i);
            if m.hash != 0 && m.pool_slot == pool_slot && m.pool_gen == gen {
                out.push(m.hash);
            }
        }
    }
    out
}

pub fn too_many_weights(pool: &str) -> ! {
    errors::error(
        Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!(
            "pool \"{pool}\" would have more than {} distinct user weights",
            crate::policy::shares::MAX_CLASSES
        ),
    )
    .hint("Use a few tiers (such as 1 for free and 5 for pro) rather than a weight per user.")
    .raise()
}
