//! `keypool_reset_usage`: starts the counting over, for when the provider's own counters were
//! reset (a new billing period, a raised quota, a support ticket) or a test day is over (seed
//! 001's reset).
//!
//! For every account (scope) of the pool's keys, or of every pool: the rolling minute and
//! today's requests and tokens go back to zero and a rate-limit cooldown ends. For the pool's
//! users: what they used of today's share goes back to zero (their shares stay fixed), and so
//! does what was lent beyond shares (in shared memory for cached members, in `keypool.member` for
//! the others). Disabled keys stay disabled (`keypool_enable_key`,
//! `keypool_enable_keys`). Hourly history is not touched. The reset acts on shared memory at
//! once; it is recorded as a `usage_reset` event.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::api::admin;
use crate::catalog::config;
use crate::catalog::grants::Privilege;
use crate::engine::access::{self};
use crate::policy::window::MinuteLog;
use crate::state::members::STRIPES;
use crate::state::shmem::{self};
use crate::state::slots::CoolingReason;

#[pg_extern(volatile, parallel_unsafe)]
fn keypool_reset_usage(pool: default!(Option<&str>, "NULL")) -> i64 {
    let _path = crate::catalog::privilege::pin_search_path();
    let sh = shmem::shared();
    let cfg = config::current();
    let pools: Vec<&crate::catalog::model::Pool> = match pool {
        Some(name) => vec![access::pool(&cfg, name, Privilege::Admin)],
        None => {
            access::require_every_pool(&cfg.grants, "reset every pool", Privilege::Admin);
            cfg.pools.iter().collect()
        }
    };
    let scopes: BTreeSet<usize> = match pool {
        Some(_) => pools
            .iter()
            .flat_map(|p| p.keys.iter().map(|&k| cfg.keys[k].scope))
            .collect(),
        None => (0..cfg.scopes.len()).collect(),
    };
    let mut reset_scopes = 0i64;
    for &s in &scopes {
        let scope = &cfg.scopes[s];
        let slot = sh.scope(scope.slot);
        let mut w = slot.lock();
        if !w.tag().is(cfg.owner, scope.id) {
            continue;
        }
        w.minute = MinuteLog::default();
        w.day.requests = 0;
        w.day.tokens = 0;
        w.day.carry_requests = 0;
        w.day.carry_tokens = 0;
        w.day.carry_until_ms = 0;
        slot.cooling_until_ms.store(0, Ordering::Release);
        slot.cooling_reason.store(CoolingReason::None as u32, Ordering::Release);
        drop(w);
        reset_scopes += 1;
    }
    let mut reset_users = 0i64;
    for p in &pools {
        let pslot = sh.pool(p.slot);
        if !pslot.tag.is(cfg.owner, p.id) {
            continue;
        }
        let mut shares = pslot.lock();
        shares.borrowed = 0;
        pslot.guests_reset();
        let gen = pslot.members_gen.load(Ordering::Acquire);
        for s in 0..STRIPES {
            let stripe = sh.members.stripe_at(s);
            for i in 0..stripe.len() {
                let m = stripe.at(i);
                if m.hash != 0 && m.pool_slot == p.slot && m.pool_gen == gen && m.used > 0 {
                    m.used = 0;
                    m.flags |= crate::state::members::FLAG_USE_DIRTY;
                    reset_users += 1;
                }
            }
        }
        drop(shares);
    }
    // Members not cached: their use of today is in the table (members.rs).
    let pool_ids: Vec<i64> = pools.iter().map(|p| p.id).collect();
    let stored_users: i64 = crate::catalog::privilege::spi_as_owner(cfg.extension_owner, |client| {
        crate::errors::spi(client.update(
            "UPDATE keypool.member SET used = 0 WHERE pool_id = ANY($1) AND used > 0 RETURNING 1",
            None,
            &[pool_ids.into()],
        ))
        .len() as i64
    });
    // Cached users were flushed or not: count each user once, as the larger of both.
    let reset_users = reset_users.max(stored_users);
    let pool_id = pool.and_then(|n| cfg.pool_by_name(n)).map(|p| p.id);
    admin::record_admin_event(
        &cfg,
        "usage_reset",
        pool_id,
        &format!(
            "by {}: {} account(s) and {} user(s) of {} start counting again",
            admin::current_role(),
            reset_scopes,
            reset_users,
            pool.map(|n| format!("pool \"{n}\""))
                .unwrap_or_else(|| "every pool".into()),
        ),
    );
    reset_scopes
}
