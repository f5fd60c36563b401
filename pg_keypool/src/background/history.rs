//! Usage history: the counters keys accumulate in shared memory are added to
//! `keypool.usage_hourly` (one row per key per hour), so storage grows with keys and time, not
//! with requests.
//!
//! A flush reads the counters, upserts them, and subtracts what it wrote only once its
//! transaction commits, so an aborted flush loses nothing and concurrent increments are kept.
//! One flush runs at a time in the whole server. Flushes run in a short-lived background worker
//! per database (launcher.rs), or on demand with `keypool_flush()`. Counts land in the hour in
//! which they are flushed (at most `pg_keypool.flush_interval` late).

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::prelude::*;
use pgrx::{pg_sys, register_xact_callback, PgXactCallbackEvent};

use crate::catalog::config::{self};
use crate::catalog::model::Config;
use crate::catalog::privilege;
use crate::errors;
use crate::state::clock;
use std::collections::HashMap;

use crate::policy::shares::NEVER;
use crate::state::members::{self, FLAG_ACTIVE_DIRTY, FLAG_USE_DIRTY, STRIPES};
use crate::state::shmem::{self, Shared};
use crate::state::slots::{COUNTERS, MEMBERS_READY};

const HOUR_MS: i64 = 3_600_000;
/// A flush holding the lock longer than this is presumed dead.
const STALE_FLUSH_MS: i64 = 60_000;

fn my_pid() -> i32 {
    unsafe { pg_sys::MyProcPid }
}

fn acquire(sh: &'static Shared) -> bool {
    let me = my_pid();
    for _ in 0..500 {
        let holder = sh.header.flush_holder.load(Ordering::Acquire);
        let since = sh.header.flush_since_ms.load(Ordering::Acquire);
        let stale = holder != 0 && clock::real_now_ms() - since > STALE_FLUSH_MS;
        if (holder == 0 || stale)
            && sh
                .header
                .flush_holder
                .compare_exchange(holder, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            sh.header.flush_since_ms.store(clock::real_now_ms(), Ordering::Release);
            return true;
        }
        if holder == me {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn release(sh: &'static Shared) {
    let _ = sh
        .header
        .flush_holder
        .compare_exchange(my_pid(), 0, Ordering::AcqRel, Ordering::Relaxed);
}

/// Adds this database's unflushed counters to the hourly history. Returns the number of keys
/// written. The counters are subtracted when the current transaction commits.
pub fn flush(cfg: &Config) -> i64 {
    let sh = shmem::shared();
    if !acquire(sh) {
        return 0;
    }
    let mut taken: Vec<(u32, [i64; COUNTERS])> = Vec::new();
    let mut key_ids: Vec<i64> = Vec::new();
    let mut columns: Vec<Vec<i64>> = vec![Vec::new(); COUNTERS];
    for key in &cfg.keys {
        let slot = sh.key(key.slot);
        if !slot.tag.is(cfg.owner, key.id) {
            continue;
        }
        let values: [i64; COUNTERS] = std::array::from_fn(|i| slot.counters[i].load(Ordering::Acquire));
        if values.iter().all(|v| *v == 0) {
            continue;
        }
        key_ids.push(key.id);
        for (col, v) in columns.iter_mut().zip(values) {
            col.push(v);
        }
        taken.push((key.slot, values));
    }
    // Counters of keys that were deleted have nowhere to go.
    let newest = cfg.keys.iter().map(|k| k.id).max().unwrap_or(0);
    for slot in sh.keys.iter() {
        if slot.tag.owner() == cfg.owner && slot.tag.id() <= newest && cfg.key_by_id(slot.tag.id()).is_none() {
            for c in &slot.counters {
                c.store(0, Ordering::Release);
            }
        }
    }
    let written = key_ids.len() as i64;
    let hour_ms = clock::now_ms().div_euclid(HOUR_MS) * HOUR_MS;
    if written > 0 {
        let mut args: Vec<pgrx::datum::DatumWithOid<'_>> = vec![clock::to_timestamptz(hour_ms).into(), key_ids.into()];
        args.extend(columns.into_iter().map(Into::into));
        privilege::as_owner(cfg.extension_owner, || {
            Spi::connect_mut(|client| {
                errors::spi(client.update(
                    "INSERT INTO keypool.usage_hourly AS u
                            (hour, key_id, requests, released, prompt_tokens, completion_tokens,
                             success, rate_limited, daily_quota, key_invalid, billing,
                             server_error, caller_error, other)
                     SELECT $1, c.*
                       FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
                                   $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
                                   $12::bigint[], $13::bigint[], $14::bigint[])
                            AS c(key_id, requests, released, prompt_tokens, completion_tokens, success,
                                 rate_limited, daily_quota, key_invalid, billing, server_error, caller_error, other)
                      WHERE EXISTS (SELECT 1 FROM keypool.key k WHERE k.id = c.key_id)
                     ON CONFLICT (key_id, hour) DO UPDATE SET
                         requests = u.requests + excluded.requests,
                         released = u.released + excluded.released,
                         prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
                         completion_tokens = u.completion_tokens + excluded.completion_tokens,
                         success = u.success + excluded.success,
                         rate_limited = u.rate_limited + excluded.rate_limited,
                         daily_quota = u.daily_quota + excluded.daily_quota,
                         key_invalid = u.key_invalid + excluded.key_invalid,
                         billing = u.billing + excluded.billing,
                         server_error = u.server_error + excluded.server_error,
                         caller_error = u.caller_error + excluded.caller_error,
                         other = u.other + excluded.other",
                    None,
                    &args,
                ));
            })
        });
    }
    let activity = flush_activity(sh, cfg);
    crate::engine::budgets::flush_user_spend(sh, cfg);
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        let Some(sh) = shmem::try_shared() else {
            return;
        };
        for w in &activity {
            let stripe = sh.members.stripe(w.hash);
            if let Some(i) = stripe.position_of(w.index) {
                let m = stripe.at(i);
                if m.hash == w.hash && m.last_active == w.last_active {
                    m.flags &= !FLAG_ACTIVE_DIRTY;
                }
                if m.hash == w.hash && m.day == w.day && m.used == w.used {
                    m.flags &= !FLAG_USE_DIRTY;
                }
            }
        }
        for (slot, values) in &taken {
            let counters = &sh.key(*slot).counters;
            for (c, v) in counters.iter().zip(values) {
                c.fetch_sub(*v, Ordering::AcqRel);
            }
        }
        release(sh);
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        if let Some(sh) = shmem::try_shared() {
            release(sh);
        }
    });
    written
}

/// A member entry as written to `keypool.member`: cleaned once the transaction commits if it
/// did not change meanwhile.
struct Written {
    index: u32,
    hash: u64,
    last_active: i32,
    day: i32,
    used: u64,
}

/// Writes the day each member was last active (needed to rebuild activity windows after a
/// restart) and what they used of their share today, with that share (read when the member is
/// cached again, and after a crash or a failover): a member's entry is then clean and may be
/// evicted (members.rs);
/// returns what was written, to mark it clean once the transaction commits.
fn flush_activity(sh: &'static Shared, cfg: &Config) -> Vec<Written> {
    let pools: HashMap<u32, (i64, u32)> = cfg
        .pools
        .iter()
        .filter(|p| sh.pool(p.slot).members_state.load(Ordering::Acquire) == MEMBERS_READY)
        .map(|p| (p.slot, (p.id, sh.pool(p.slot).members_gen.load(Ordering::Acquire))))
        .collect();
    if pools.is_empty() {
        return Vec::new();
    }
    let (mut pool_ids, mut hashes, mut days, mut used_on, mut used, mut share) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut written = Vec::new();
    for s in 0..STRIPES {
        let stripe = sh.members.stripe_at(s);
        for i in 0..stripe.len() {
            let m = stripe.at(i);
            if m.hash == 0 || m.flags & (FLAG_ACTIVE_DIRTY | FLAG_USE_DIRTY) == 0 || !m.is_member() {
                continue;
            }
            if let Some(&(pool_id, gen)) = pools.get(&m.pool_slot) {
                if gen == m.pool_gen {
                    pool_ids.push(pool_id);
                    hashes.push(members::hash_to_sql(m.hash));
                    days.push(m.last_active);
                    used_on.push(m.day);
                    used.push(m.used.min(i64::MAX as u64) as i64);
                    share.push(m.share.min(i64::MAX as u64) as i64);
                    written.push(Written {
                        index: stripe.index_of(i),
                        hash: m.hash,
                        last_active: m.last_active,
                        day: m.day,
                        used: m.used,
                    });
                }
            }
        }
    }
    if !written.is_empty() {
        privilege::as_owner(cfg.extension_owner, || {
            Spi::connect_mut(|client| {
                errors::spi(client.update(
                    &format!(
                        "UPDATE keypool.member m
                            SET last_active = CASE WHEN v.d = {NEVER} THEN m.last_active ELSE DATE '1970-01-01' + v.d END,
                                used_on = CASE WHEN v.ud = {NEVER} THEN NULL ELSE DATE '1970-01-01' + v.ud END,
                                used = v.u,
                                share = v.s
                           FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::int[], $5::bigint[], $6::bigint[])
                                AS v(p, h, d, ud, u, s)
                          WHERE m.pool_id = v.p AND m.user_hash = v.h"
                    ),
                    None,
                    &[
                        pool_ids.into(),
                        hashes.into(),
                        days.into(),
                        used_on.into(),
                        used.into(),
                        share.into(),
                    ],
                ));
            })
        });
    }
    written
}

/// `keypool_flush()`: writes the usage counters to the hourly history now. Needs `admin` on
/// every pool (it writes every pool's history).
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_flush() -> i64 {
    let _path = privilege::pin_search_path();
    let cfg = config::current();
    crate::engine::access::require_every_pool(
        &cfg.grants,
        "flush usage history",
        crate::catalog::grants::Privilege::Admin,
    );
    let written = flush(&cfg);
    crate::catalog::failover::record(shmem::shared(), &cfg);
    written
}
