//! Failover without over-grant: what a promoted standby (or a restored backup) knows about rate
//! windows is stale, so it catches up from what the primary recorded in replicated tables.
//!
//! - **Record** (on the primary): every `pg_keypool.flush_interval`, in the flusher's
//!   transaction with the usage history, each scope's day usage and cooldown goes to
//!   `keypool.scope_usage` (one small row per scope, rewritten only when it changed: HOT
//!   updates), and the time it was read to `keypool.usage_snapshot`.
//! - **Stale** (persist.rs): a server that starts a recovery (a standby, an archive recovery, a
//!   restored base backup) or finds a state file of another timeline or system marks its state
//!   `stale_pending`. The first process that sees recovery over (the launcher, which starts
//!   exactly then, or a backend's reserve, whichever comes first) bumps `stale_epoch` and the
//!   configuration generation, so every backend reloads its configuration before its next grant.
//! - **Catch up** (config.rs, on that reload): every scope of the database whose
//!   `caught_up_epoch` is behind takes the larger of its own day and the record plus what its
//!   limits allowed from the record's time until now (`ScopeWindows::catch_up`), and its minute
//!   window is full for one minute from now. Scopes created after the end of recovery are new
//!   and need nothing.
//! - **No state file** (a data directory whose tables were copied in by `pg_upgrade` or a
//!   restore, or a new one): the launcher ends this "recovery" as the server starts, so only
//!   scopes that came with the tables catch up, and only if a record came with them; the cluster
//!   that wrote the record has stopped, so nothing is assumed of the time since: today's recorded
//!   use counts, and the minute is full only if the record is recent enough for its grants to
//!   still be in it (`ScopeWindows::apply_record`).
//!
//! The record only raises counts: a catch-up that runs twice (two backends at once, or again
//! after a crash soon after promotion) costs at most another minute's worth.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::model::{Config, Scope};
use crate::catalog::privilege;
use crate::errors;
use crate::policy::calendar;
use crate::policy::window::DayWindow;
use crate::state::clock;
use crate::state::persist::Origin;
use crate::state::shmem::Shared;
use crate::state::slots::Owner;

/// Starts a catch-up if this server's state is stale and recovery is over. One atomic load
/// when nothing is pending (the hot path calls it on every reservation).
#[inline]
pub fn end_recovery_if_pending(sh: &Shared) {
    if sh.header.stale_pending.load(Ordering::Acquire) != 0 {
        end_recovery(sh);
    }
}

#[cold]
fn end_recovery(sh: &Shared) {
    if unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    let _registry = sh.header.registry.exclusive();
    if sh.header.stale_pending.load(Ordering::Acquire) == 0 {
        return;
    }
    sh.header
        .recovery_ended_ms
        .store(clock::real_now_ms(), Ordering::Release);
    sh.header.stale_epoch.fetch_add(1, Ordering::AcqRel);
    // Members load again from keypool.member, which holds what the primary last flushed of their
    // use today (a standby's memory knows nothing newer).
    for pool in sh.pools.iter().filter(|p| !p.tag.is_free()) {
        pool.members_gen.fetch_add(1, Ordering::AcqRel);
        pool.members_state
            .store(crate::state::slots::MEMBERS_UNLOADED, Ordering::Release);
    }
    // Every backend reloads its configuration, and catches up, before its next grant.
    sh.bump_config_generation();
    sh.header.stale_pending.store(0, Ordering::Release);
}

/// Brings this database's scopes up to what the primary recorded (config.rs, when a
/// configuration is loaded). Runs as the extension's owner inside an SPI connection.
pub fn catch_up(sh: &Shared, owner: Owner, scopes: &[Scope]) {
    let epoch = sh.header.stale_epoch.load(Ordering::Acquire);
    if epoch == 0 || unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    let behind: Vec<&Scope> = scopes
        .iter()
        .filter(|s| sh.scope(s.slot).caught_up_epoch.load(Ordering::Acquire) != epoch)
        .collect();
    if behind.is_empty() {
        return;
    }
    let ended = sh.header.recovery_ended_ms.load(Ordering::Acquire);
    let rows = crate::catalog::query::fresh_rows(
        c"SELECT s.id, (extract(epoch FROM s.created_at) * 1000)::bigint,
                 (extract(epoch FROM u.day_start) * 1000)::bigint, (extract(epoch FROM u.day_end) * 1000)::bigint,
                 u.requests, u.tokens, (extract(epoch FROM u.cooling_until) * 1000)::bigint,
                 (SELECT (extract(epoch FROM n.saved_at) * 1000)::bigint FROM keypool.usage_snapshot n)
            FROM keypool.scope s LEFT JOIN keypool.scope_usage u ON u.scope_id = s.id",
        |r| {
            let id: i64 = r.get(0);
            let created: i64 = r.get(1);
            let day = r.get_opt::<i64>(2).map(|start| DayWindow {
                start_ms: start,
                end_ms: r.get_opt::<i64>(3).unwrap_or(start),
                requests: r.get_opt::<i64>(4).unwrap_or(0).max(0) as u64,
                tokens: r.get_opt::<i64>(5).unwrap_or(0).max(0) as u64,
                ..Default::default()
            });
            let cooling: Option<i64> = r.get_opt(6);
            let snapshot: Option<i64> = r.get_opt(7);
            (id, (created, day, cooling, snapshot))
        },
    );
    let rows: std::collections::HashMap<i64, _> = rows.into_iter().collect();
    let now = clock::now_ms();
    let copied = Origin::from_u32(sh.header.restored.load(Ordering::Acquire)) == Origin::NoFile;
    for scope in behind {
        let slot = sh.scope(scope.slot);
        let Some(&(created, day, cooling, snapshot)) = rows.get(&scope.id) else {
            continue;
        };
        if created < ended && !(copied && snapshot.is_none()) {
            // The last point the primary's use of this scope is known at: its record, or, for a
            // scope the record does not know yet, its creation (nothing used then).
            let (recorded, at) = match (day, snapshot) {
                (Some(day), Some(at)) => (day, at),
                (None, Some(at)) if at >= created => (DayWindow::default(), at),
                _ => (DayWindow::default(), created),
            };
            let mut w = slot.lock();
            if !w.tag().is(owner, scope.id) {
                continue;
            }
            let bounds = |t| calendar::day_bounds(scope.tz, t);
            if copied {
                // The cluster that wrote the record has stopped: nothing was used since.
                w.apply_record(
                    recorded,
                    at,
                    i64::from(crate::settings::FLUSH_INTERVAL_MS.get()),
                    now,
                    bounds,
                );
            } else {
                w.catch_up(recorded, at, now, bounds);
            }
            drop(w);
            if let Some(until) = cooling {
                slot.cool_until(until, crate::state::slots::CoolingReason::RateLimited);
            }
        }
        slot.caught_up_epoch.store(epoch, Ordering::Release);
    }
}

/// Writes this database's scopes' day usage to `keypool.scope_usage` (rows that changed only)
/// and the time it was read to `keypool.usage_snapshot`. In the flusher's transaction.
pub fn record(sh: &Shared, cfg: &Config) {
    let now = clock::now_ms();
    let (mut ids, mut starts, mut ends, mut requests, mut tokens, mut cooling) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for scope in &cfg.scopes {
        let slot = sh.scope(scope.slot);
        let (day, until) = {
            let w = slot.lock();
            if !w.tag().is(cfg.owner, scope.id) {
                continue;
            }
            (w.day, slot.cooling(now).map(|(until, _)| until))
        };
        if (day.start_ms == 0 || now >= day.end_ms) && until.is_none() {
            continue;
        }
        ids.push(scope.id);
        starts.push(clock::to_timestamptz(if day.start_ms == 0 {
            now
        } else {
            day.start_ms
        }));
        ends.push(clock::to_timestamptz(if day.start_ms == 0 { now } else { day.end_ms }));
        requests.push(day.requests.min(i64::MAX as u64) as i64);
        tokens.push(day.tokens.min(i64::MAX as u64) as i64);
        cooling.push(until.map(clock::to_timestamptz));
    }
    // What each pool with a budget spent in its current period.
    let (mut pool_ids, mut period_starts, mut spent) = (Vec::new(), Vec::new(), Vec::new());
    for pool in &cfg.pools {
        let Some(budget) = &pool.budget else {
            continue;
        };
        let slot = sh.pool(pool.slot);
        if !slot.tag.is(cfg.owner, pool.id) {
            continue;
        }
        let (start, _) = crate::policy::money::period(budget, pool.tz, now);
        pool_ids.push(pool.id);
        period_starts.push(start);
        spent.push(slot.spend.of(start).min(i64::MAX as u64) as i64);
    }
    privilege::as_owner(cfg.extension_owner, || {
        Spi::connect_mut(|client| {
            if !pool_ids.is_empty() {
                errors::spi(client.update(
                    "INSERT INTO keypool.pool_spend AS u (pool_id, period_start, spent)
                     SELECT c.id, DATE '1970-01-01' + c.d, c.s
                       FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS c(id, d, s)
                      WHERE EXISTS (SELECT 1 FROM keypool.pool p WHERE p.id = c.id)
                        AND NOT EXISTS (SELECT 1 FROM keypool.pool_spend o
                                         WHERE o.pool_id = c.id AND o.period_start = DATE '1970-01-01' + c.d
                                           AND o.spent >= c.s)
                     ON CONFLICT (pool_id) DO UPDATE SET period_start = excluded.period_start, spent = excluded.spent",
                    None,
                    &[pool_ids.into(), period_starts.into(), spent.into()],
                ));
            }
            if !ids.is_empty() {
                errors::spi(client.update(
                    // Unchanged rows are left out before the upsert: ON CONFLICT would lock (and
                    // log) every row it meets, changed or not.
                    "INSERT INTO keypool.scope_usage AS u (scope_id, day_start, day_end, requests, tokens, cooling_until)
                     SELECT c.* FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $4::bigint[],
                                            $5::bigint[], $6::timestamptz[]) AS c(id, s, e, r, t, cu)
                      WHERE EXISTS (SELECT 1 FROM keypool.scope s WHERE s.id = c.id)
                        AND NOT EXISTS (SELECT 1 FROM keypool.scope_usage o
                                         WHERE o.scope_id = c.id
                                           AND (o.day_start, o.day_end, o.requests, o.tokens, o.cooling_until)
                                               IS NOT DISTINCT FROM (c.s, c.e, c.r, c.t, c.cu))
                     ON CONFLICT (scope_id) DO UPDATE SET
                         day_start = excluded.day_start, day_end = excluded.day_end,
                         requests = excluded.requests, tokens = excluded.tokens,
                         cooling_until = excluded.cooling_until",
                    None,
                    &[
                        ids.into(),
                        starts.into(),
                        ends.into(),
                        requests.into(),
                        tokens.into(),
                        cooling.into(),
                    ],
                ));
            }
            errors::spi(client.update(
                "INSERT INTO keypool.usage_snapshot AS n (saved_at) VALUES ($1)
                 ON CONFLICT (one) DO UPDATE SET saved_at = excluded.saved_at",
                None,
                &[clock::to_timestamptz(now).into()],
            ));
        })
    });
}
