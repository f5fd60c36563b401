//! Functions over shared-memory state: what the views in `sql/api.sql` read, saving the state
//! file (`keypool_save_state`), and the test clock.

use std::sync::atomic::Ordering;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::catalog::config;
use crate::catalog::privilege;
use crate::engine::access;
use crate::errors;
use crate::state::clock;
use crate::state::persist;
use crate::state::shmem;

type Ts = Option<TimestampWithTimeZone>;

/// `keypool_now()`: the time as pg_keypool sees it in this database.
#[pg_extern(volatile, parallel_safe)]
fn keypool_now() -> TimestampWithTimeZone {
    clock::to_timestamptz(clock::now_ms())
}

/// `keypool_set_clock(at)`: freezes pg_keypool's clock in this database (tests); NULL returns it
/// to wall time. Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_set_clock(at: Option<TimestampWithTimeZone>) -> TimestampWithTimeZone {
    if !unsafe { pgrx::pg_sys::superuser() } {
        errors::error(
            errors::Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser can set pg_keypool's clock",
        )
        .raise();
    }
    let at_ms = at.map(|ts| {
        if !ts.is_finite() {
            errors::invalid("the clock cannot be set to infinity").raise();
        }
        let ms = clock::from_timestamptz(ts);
        // 1970-01-01 .. 9999-12-31: far from any overflow in window arithmetic.
        if !(0..=253_402_300_799_000).contains(&ms) {
            errors::invalid("the clock must be set between 1970 and 9999").raise();
        }
        ms
    });
    clock::set(at_ms);
    clock::to_timestamptz(clock::now_ms())
}

/// `keypool_status()`: one row about the shared-memory state of the server.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn keypool_status() -> TableIterator<
    'static,
    (
        name!(scopes_used, i32),
        name!(scopes_capacity, i32),
        name!(keys_used, i32),
        name!(keys_capacity, i32),
        name!(reservation_capacity, i32),
        name!(reservations_expired_early, i64),
        name!(reservations_open, i64),
        name!(state_saved_at, Ts),
        name!(started_from, String),
        name!(state_timeline, Option<i32>),
        name!(recovery_ended_at, Ts),
        name!(callers_untracked, i64),
    ),
> {
    let sh = shmem::shared();
    let h = sh.header;
    let saved = h.state_saved_ms.load(Ordering::Acquire);
    let started = crate::state::persist::Origin::from_u32(h.restored.load(Ordering::Acquire)).describe();
    let timeline = h.loaded_timeline.load(Ordering::Acquire);
    let ended = h.recovery_ended_ms.load(Ordering::Acquire);
    TableIterator::once((
        sh.scopes.iter().filter(|s| !s.tag.is_free()).count() as i32,
        h.scope_capacity as i32,
        sh.keys.iter().filter(|k| !k.tag.is_free()).count() as i32,
        h.key_capacity as i32,
        h.reservation_capacity as i32,
        h.reservations_evicted.load(Ordering::Acquire) as i64,
        crate::state::reservation::open_count(sh, clock::now_ms(), crate::settings::lease_ms()) as i64,
        (saved > 0).then(|| clock::to_timestamptz(saved)),
        started.to_string(),
        (timeline > 0).then_some(timeline as i32),
        (ended > 0).then(|| clock::to_timestamptz(ended)),
        sh.callers.untracked.load(Ordering::Acquire) as i64,
    ))
}

/// Internal functions, in the extension's private schema.
#[pg_schema]
mod keypool {
    use std::sync::atomic::Ordering;

    use pgrx::datum::TimestampWithTimeZone;
    use pgrx::prelude::*;

    use crate::catalog::config;
    use crate::catalog::grants::Privilege;
    use crate::policy::calendar;
    use crate::policy::shares::{PoolShares, WEIGHT_SCALE};
    use crate::state::clock;
    use crate::state::shmem;

    type Ts = Option<TimestampWithTimeZone>;

    /// Live window usage of every scope of this database.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn scope_state() -> TableIterator<
        'static,
        (
            name!(scope_id, i64),
            name!(requests_this_minute, i64),
            name!(tokens_this_minute, i64),
            name!(requests_today, i64),
            name!(tokens_today, i64),
            name!(day_resets_at, Ts),
            name!(cooling_until, Ts),
            name!(cooling_reason, Option<String>),
        ),
    > {
        let _path = crate::catalog::privilege::pin_search_path();
        let sh = shmem::shared();
        let cfg = config::current();
        let caller = crate::catalog::privilege::caller();
        let now = clock::now_ms();
        let rows: Vec<_> = cfg
            .scopes
            .iter()
            .filter(|scope| crate::engine::access::may_read_scope(&cfg, caller, scope.id))
            .filter_map(|scope| {
                let slot = sh.scope(scope.slot);
                let windows = {
                    let w = slot.lock();
                    if !w.tag().is(cfg.owner, scope.id) {
                        return None;
                    }
                    *w
                };
                let (mr, mt, dr, dt) = windows.usage(now);
                let (_, day_end) = calendar::day_bounds(scope.tz, now);
                let cooling = slot.cooling(now);
                Some((
                    scope.id,
                    mr as i64,
                    mt as i64,
                    dr as i64,
                    dt as i64,
                    Some(clock::to_timestamptz(day_end)),
                    cooling.map(|(until, _)| clock::to_timestamptz(until)),
                    cooling.map(|(_, reason)| reason.as_str().to_string()),
                ))
            })
            .collect();
        TableIterator::new(rows)
    }

    /// Live state of every key of this database: circuit breaker, last use, users, and the usage
    /// counters not yet flushed to the hourly history (in `Counter` order: requests, released,
    /// prompt and completion tokens, success, then the error classes).
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn key_state() -> TableIterator<
        'static,
        (
            name!(key_id, i64),
            name!(breaker, String),
            name!(breaker_open_until, Ts),
            name!(consecutive_failures, i32),
            name!(last_used_at, Ts),
            name!(users, i64),
            name!(unflushed, Vec<i64>),
        ),
    > {
        let _path = crate::catalog::privilege::pin_search_path();
        let sh = shmem::shared();
        let cfg = config::current();
        crate::engine::member_load::ensure_all_loaded(sh, &cfg);
        let caller = crate::catalog::privilege::caller();
        let now = clock::now_ms();
        let rows: Vec<_> = cfg
            .keys
            .iter()
            .filter(|key| cfg.grants.allows(caller, Some(key.pool_id), Privilege::Read))
            .filter_map(|key| {
                let slot = sh.key(key.slot);
                if !slot.tag.is(cfg.owner, key.id) {
                    return None;
                }
                let open_until = slot.breaker_open_until_ms.load(Ordering::Acquire);
                let breaker = match open_until {
                    0 => "closed",
                    t if now < t => "open",
                    _ => "half_open",
                };
                let last_used = slot.last_used_ms.load(Ordering::Acquire);
                Some((
                    key.id,
                    breaker.to_string(),
                    (open_until > now).then(|| clock::to_timestamptz(open_until)),
                    slot.consecutive_failures.load(Ordering::Acquire) as i32,
                    (last_used > 0).then(|| clock::to_timestamptz(last_used)),
                    slot.assigned.load(Ordering::Acquire),
                    slot.counters.iter().map(|c| c.load(Ordering::Acquire)).collect(),
                ))
            })
            .collect();
        TableIterator::new(rows)
    }

    /// What providers reported of the scopes this role may read, when less than their windows
    /// count (provider_hold.rs): what is left of each measure and until when the hold lasts.
    /// Open to every role, like the views' filters: it answers only about those scopes.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn scope_provider_state() -> TableIterator<
        'static,
        (
            name!(scope_id, i64),
            name!(requests_left, Option<i64>),
            name!(tokens_left, Option<i64>),
            name!(held_until, Ts),
        ),
    > {
        let _path = crate::catalog::privilege::pin_search_path();
        let sh = shmem::shared();
        let cfg = config::current();
        let caller = crate::catalog::privilege::caller();
        let now = clock::now_ms();
        let rows: Vec<_> = cfg
            .scopes
            .iter()
            .filter(|scope| crate::engine::access::may_read_scope(&cfg, caller, scope.id))
            .filter_map(|scope| {
                let slot = sh.scope(scope.slot);
                if !slot.tag.is(cfg.owner, scope.id) {
                    return None;
                }
                let (requests, tokens) = slot.provider.snapshot(now);
                let until = requests.iter().chain(tokens.iter()).map(|&(_, until)| until).max()?;
                Some((
                    scope.id,
                    requests.map(|(left, _)| left),
                    tokens.map(|(left, _)| left),
                    Some(clock::to_timestamptz(until)),
                ))
            })
            .collect();
        TableIterator::new(rows)
    }

    /// Reservations open right now on each key with a `max_concurrent`, of the keys this role
    /// may read (open to every role, like the views' filters: it answers only about those).
    #[pg_extern(volatile, parallel_unsafe)]
    fn key_load() -> TableIterator<'static, (name!(key_id, i64), name!(open_reservations, i32))> {
        let _path = crate::catalog::privilege::pin_search_path();
        let sh = shmem::shared();
        let cfg = config::current();
        let caller = crate::catalog::privilege::caller();
        let (now, lease) = (clock::now_ms(), crate::settings::lease_ms());
        let rows: Vec<_> = cfg
            .keys
            .iter()
            .filter(|key| key.max_concurrent.is_some())
            .filter(|key| cfg.grants.allows(caller, Some(key.pool_id), Privilege::Read))
            .filter_map(|key| {
                let slot = sh.key(key.slot);
                slot.tag
                    .is(cfg.owner, key.id)
                    .then(|| (key.id, slot.open.open(now, lease).min(i32::MAX as u32) as i32))
            })
            .collect();
        TableIterator::new(rows)
    }

    /// The shared-memory member cache of the whole server: its entries and bytes, how many hold
    /// members and guests, how many are free, what guest floods cost (guest entries given to
    /// members, requests served from pools' shared guest allowances), and how the cache does:
    /// reservations that found their user cached, members read from `keypool.member`, entries
    /// evicted, and requests of members served without an entry.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn member_memory() -> TableIterator<
        'static,
        (
            name!(entries, i64),
            name!(members, i64),
            name!(guests, i64),
            name!(free, i64),
            name!(full_stripes, i64),
            name!(guest_entries_taken_over, i64),
            name!(guest_requests_shared, i64),
            name!(bytes, i64),
            name!(hits, i64),
            name!(loads, i64),
            name!(evictions, i64),
            name!(members_uncached, i64),
        ),
    > {
        let sh = shmem::shared();
        let today = (clock::now_ms().div_euclid(86_400_000)) as i32;
        let (mut members, mut guests, mut full) = (0i64, 0i64, 0i64);
        for s in 0..crate::state::members::STRIPES {
            let stripe = sh.members.stripe_at(s);
            let (m, g) = stripe.counts(today);
            members += m as i64;
            guests += g as i64;
            if m + g == stripe.len() {
                full += 1;
            }
        }
        let entries = sh.members.cells.len() as i64;
        let bytes = entries * std::mem::size_of::<crate::state::members::Member>() as i64
            + (crate::state::members::STRIPES * std::mem::size_of::<crate::state::members::StripeStats>()) as i64;
        let (hits, loads, evictions, uncached) = sh.members.totals();
        TableIterator::once((
            entries,
            members,
            guests,
            entries - members - guests,
            full,
            sh.header.guests_evicted.load(Ordering::Acquire) as i64,
            sh.header.guests_untracked.load(Ordering::Acquire) as i64,
            bytes,
            hits as i64,
            loads as i64,
            evictions as i64,
            uncached as i64,
        ))
    }

    /// Marks this backend's configuration cache stale; called by the trigger on the tables.
    #[pg_extern(volatile, parallel_unsafe)]
    fn note_config_change() {
        config::note_change();
    }

    /// How every pool of this database shares its daily capacity right now.
    #[pg_extern(volatile, parallel_unsafe)]
    #[allow(clippy::type_complexity)]
    fn pool_state() -> TableIterator<
        'static,
        (
            name!(pool_id, i64),
            name!(members, i64),
            name!(counted_users, i64),
            name!(daily_capacity, Option<i64>),
            name!(daily_token_capacity, Option<i64>),
            name!(share_per_user, Option<i64>),
            name!(overcommit, Option<f64>),
            name!(active_today, i64),
            name!(borrowed_today, i64),
            name!(timezone, String),
            name!(resets_at, TimestampWithTimeZone),
        ),
    > {
        let _path = crate::catalog::privilege::pin_search_path();
        let sh = shmem::shared();
        let cfg = config::current();
        let caller = crate::catalog::privilege::caller();
        let now = clock::now_ms();
        let rows: Vec<_> = cfg
            .pools
            .iter()
            .filter(|pool| cfg.grants.allows(caller, Some(pool.id), Privilege::Read))
            .map(|pool| {
                crate::engine::member_load::ensure_loaded(sh, &cfg, pool);
                let (today, _, day_end) = pool.day(now);
                let mut shares = *sh.pool(pool.slot).lock();
                shares.roll(today);
                let policy = pool.policy;
                let classes = &shares.classes[..shares.n_classes as usize];
                let members: i64 = classes.iter().map(|c| c.members).sum();
                let counted_weight = shares.counted_weight(today, policy.window_days);
                let counted = crate::policy::shares::counted_users(&shares, today, policy.window_days);
                let active_today = crate::policy::shares::counted_users(&shares, today, Some(1));
                // The share of a user of weight 1 who is counted.
                let share = PoolShares::share(&policy, WEIGHT_SCALE, counted_weight.max(WEIGHT_SCALE));
                (
                    pool.id,
                    members,
                    counted,
                    policy.capacity.map(|c| c as i64),
                    pool.token_capacity.map(|c| c as i64),
                    share.map(|s| s as i64),
                    shares.overcommit(&policy, today),
                    active_today,
                    shares.borrowed as i64,
                    pool.tz.name().to_string(),
                    clock::to_timestamptz(day_end),
                )
            })
            .collect();
        TableIterator::new(rows)
    }

    /// For each pool this role may read: requests it refused today that its fallback chain
    /// served, and what it spent of its budget in the current period.
    #[pg_extern(stable, parallel_safe)]
    #[allow(clippy::type_complexity)]
    fn routing_state() -> TableIterator<
        'static,
        (
            name!(pool_id, i64),
            name!(fell_through_today, i64),
            name!(spent_micros, Option<i64>),
            name!(budget_resets_at, Option<TimestampWithTimeZone>),
        ),
    > {
        let _path = crate::catalog::privilege::pin_search_path();
        let sh = shmem::shared();
        let cfg = config::current();
        let caller = crate::catalog::privilege::caller();
        let now = clock::now_ms();
        let rows: Vec<_> = cfg
            .pools
            .iter()
            .filter(|pool| cfg.grants.allows(caller, Some(pool.id), Privilege::Read))
            .map(|pool| {
                let slot = sh.pool(pool.slot);
                let (spent, resets_at) = match &pool.budget {
                    Some(b) => {
                        let (start, end) = crate::policy::money::period(b, pool.tz, now);
                        (Some(slot.spend.of(start) as i64), Some(clock::to_timestamptz(end)))
                    }
                    None => (None, None),
                };
                (pool.id, slot.fell_through.on(pool.day(now).0) as i64, spent, resets_at)
            })
            .collect();
        TableIterator::new(rows)
    }
}
/// `keypool_save_state()`: writes the state file now.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_save_state() -> pgrx::datum::TimestampWithTimeZone {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let cfg = config::current();
    access::require_every_pool(
        &cfg.grants,
        "save pg_keypool's state",
        crate::catalog::grants::Privilege::Admin,
    );
    if let Err(e) = persist::save(sh) {
        errors::error(
            errors::Code::ERRCODE_IO_ERROR,
            format!("could not write {}: {e}", persist::FILE),
        )
        .raise();
    }
    clock::to_timestamptz(sh.header.state_saved_ms.load(Ordering::Acquire))
}
