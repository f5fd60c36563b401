//! Each backend's cache of the configuration tables (pools, keys, scopes), so that the hot path
//! never queries a table.
//!
//! Any change to those tables fires a trigger that marks this backend's cache stale at once and
//! bumps the shared generation when the transaction ends (commit or abort); every backend
//! compares that generation on each call and reloads when it moved. A reload reads the tables
//! with the latest snapshot, whatever the caller's isolation level, as the extension's owner,
//! binds shared-memory slots to the rows (registry.rs) and writes each scope's limits into its
//! slot.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use chrono_tz::Tz;
use pgrx::prelude::*;
use pgrx::{pg_sys, register_xact_callback, PgXactCallbackEvent};

use crate::catalog::grants::Grants;
use crate::catalog::model::{Config, Key, Pool, Scope, Tier};
use crate::catalog::privilege::{self, extension_owner};
use crate::catalog::query::fresh_rows;
use crate::catalog::vault;
use crate::errors::{self, Code};
use crate::policy::calendar;
use crate::policy::minute::{Capacity, UserLimits};
use crate::policy::money::{Budget, Period, Price};
use crate::policy::shares::Policy;
use crate::policy::window::Limits;
use crate::state::clock;
use crate::state::registry::{self, Fit, Wanted};
use crate::state::shmem::{self, Shared};
use crate::state::slots::Owner;

thread_local! {
    static CACHE: RefCell<Option<Rc<Config>>> = const { RefCell::new(None) };
    static STALE: Cell<bool> = const { Cell::new(false) };
    static XACT_HOOKED: Cell<bool> = const { Cell::new(false) };
}

/// The current configuration, reloaded if anything changed since it was cached.
pub fn current() -> Rc<Config> {
    let sh = shmem::shared();
    let generation = sh.config_generation();
    if !STALE.get() {
        if let Some(cfg) = CACHE.with_borrow(|c| c.clone()) {
            if cfg.generation == generation {
                return cfg;
            }
        }
    }
    reload(sh, generation)
}

/// Reloads now, for example after a slot was found re-bound.
pub fn reload_now() -> Rc<Config> {
    let sh = shmem::shared();
    reload(sh, sh.config_generation())
}

fn reload(sh: &Shared, generation: u64) -> Rc<Config> {
    STALE.set(false);
    let cfg = Rc::new(load(sh, generation, Fit::Lenient));
    CACHE.with_borrow_mut(|c| *c = Some(cfg.clone()));
    cfg
}

/// Reloads with the configuration as this transaction sees it (its own changes included) and
/// refuses with 53400 when it does not fit in shared memory: for the functions that add keys
/// and pools, so that the one who adds learns it, and nobody's next reservation does.
/// `keys` and `scopes` are the rows the transaction adds. Without the preloaded library there is
/// no shared memory to fit into, and nothing is checked (`None`).
pub fn refuse_unless_it_fits(keys: &[i64], scopes: &[i64]) -> Option<Rc<Config>> {
    let sh = shmem::try_shared()?;
    let cfg = Rc::new(load(sh, sh.config_generation(), Fit::Strict { keys, scopes }));
    CACHE.with_borrow_mut(|c| *c = Some(cfg.clone()));
    Some(cfg)
}

/// Called by the trigger on the configuration tables.
pub fn note_change() {
    STALE.set(true);
    if !XACT_HOOKED.replace(true) {
        // Whichever way the transaction ends, other backends must reload: after a commit to see
        // the change, after an abort because this backend may have written uncommitted limits
        // into shared memory.
        register_xact_callback(PgXactCallbackEvent::Commit, end_of_change);
        register_xact_callback(PgXactCallbackEvent::Abort, end_of_change);
    }
}

fn end_of_change() {
    XACT_HOOKED.set(false);
    STALE.set(true);
    if let Some(sh) = shmem::try_shared() {
        sh.bump_config_generation();
    }
}

fn load(sh: &Shared, generation: u64, fit: Fit<'_>) -> Config {
    let extension_owner = extension_owner();
    let now = clock::now_ms();
    privilege::as_owner(extension_owner, || {
        Spi::connect(|_| {
            let instance: Vec<i64> = fresh_rows(c"SELECT id FROM keypool.instance", |r| r.get(0));
            let Some(&instance) = instance.first() else {
                errors::error(
                    Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "pg_keypool's instance row is missing",
                )
                .hint("Re-create the extension.")
                .raise()
            };
            let owner = Owner {
                dboid: unsafe { pg_sys::MyDatabaseId.to_u32() },
                instance,
            };
            let live_databases: HashSet<u32> = fresh_rows(c"SELECT oid FROM pg_catalog.pg_database", |r| {
                r.get::<pg_sys::Oid>(0).to_u32()
            })
            .into_iter()
            .collect();
            #[allow(clippy::type_complexity)]
            let pools: Vec<PoolRow> = fresh_rows(
                c"SELECT id, name, min_share, active_days, borrowing, timezone, fallback_on_quota,
                         budget_micros, budget_per_user_micros, budget_period, default_cost_micros, owner_fallback,
                         CASE WHEN minute_share IS NULL THEN 0 ELSE greatest(1, ceil(minute_share * 1000))::bigint END,
                         coalesce(user_rpm, 0)::bigint,
                         coalesce(user_tpm, 0), coalesce(user_max_concurrent, 0)
                    FROM keypool.pool ORDER BY id",
                |r| PoolRow {
                    id: r.get(0),
                    name: r.get(1),
                    min_share: r.get(2),
                    active_days: r.get_opt(3),
                    borrowing: r.get(4),
                    timezone: r.get_opt(5),
                    fallback_on_quota: r.get(6),
                    budget: r.get_opt::<String>(9).map(|period| Budget {
                        limit: r.get_opt::<i64>(7).map(|v| v.max(0) as u64),
                        per_user: r.get_opt::<i64>(8).map(|v| v.max(0) as u64),
                        period: if period == "month" { Period::Month } else { Period::Day },
                        default_cost: r.get::<i64>(10).max(0) as u64,
                    }),
                    owner_fallback: r.get(11),
                    user_limits: UserLimits {
                        share_milli: r.get::<i64>(12).max(0) as u64,
                        rpm: r.get::<i64>(13).max(0) as u64,
                        tpm: r.get::<i64>(14).max(0) as u64,
                        max_concurrent: r.get::<i32>(15).max(0) as u32,
                    },
                },
            );
            // Prices in millionths, rounded up (a price finer than that never undercounts).
            let prices: HashMap<(String, String), Price> = fresh_rows(
                c"SELECT provider, model, ceil(input_per_million * 1000000)::bigint,
                         ceil(output_per_million * 1000000)::bigint, ceil(per_request * 1000000)::bigint
                    FROM keypool.price",
                |r| {
                    (
                        (r.get::<String>(0), r.get::<String>(1)),
                        Price {
                            input_per_million: r.get::<i64>(2).max(0) as u64,
                            output_per_million: r.get::<i64>(3).max(0) as u64,
                            per_request: r.get::<i64>(4).max(0) as u64,
                        },
                    )
                },
            )
            .into_iter()
            .collect();
            let fallbacks: Vec<(i64, i64)> = fresh_rows(
                c"SELECT pool_id, fallback_id FROM keypool.pool_fallback ORDER BY pool_id, position",
                |r| (r.get(0), r.get(1)),
            );
            let scopes: Vec<(i64, Limits, String, bool)> = fresh_rows(
                c"SELECT id, rpm::bigint, rpd::bigint, tpm, tpd, timezone, disabled_reason IS NOT NULL
                    FROM keypool.scope ORDER BY id",
                |r| {
                    let limit = |i| r.get_opt::<i64>(i).map(|v| v.max(0) as u64).unwrap_or(0);
                    (
                        r.get(0),
                        Limits {
                            rpm: limit(1),
                            rpd: limit(2),
                            tpm: limit(3),
                            tpd: limit(4),
                        },
                        r.get(5),
                        r.get(6),
                    )
                },
            );
            let keys: Vec<KeyRow> = fresh_rows(
                c"SELECT id, pool_id, scope_id, provider, model, base_url, secret_sealed, label, group_no,
                         disabled_reason IS NOT NULL, priority, owner, coalesce(max_concurrent, 0)
                    FROM keypool.key WHERE removed_at IS NULL ORDER BY id",
                |r| KeyRow {
                    id: r.get(0),
                    pool_id: r.get(1),
                    scope_id: r.get(2),
                    provider: r.get(3),
                    model: r.get_opt(4),
                    base_url: r.get(5),
                    sealed: r.get(6),
                    label: r.get(7),
                    group_no: r.get(8),
                    disabled: r.get(9),
                    priority: r.get(10),
                    owner: r.get_opt(11),
                    max_concurrent: r.get::<i32>(12).max(0) as u32,
                },
            );

            let grant_rows = fresh_rows(
                c"SELECT pool_id, grantee::oid, privilege FROM keypool.pool_grant",
                |r| (r.get_opt::<i64>(0), r.get::<pg_sys::Oid>(1), r.get::<String>(2)),
            );
            let grants = Rc::new(Grants::from_rows(extension_owner, grant_rows));

            let master_keys: vault::Recorded = fresh_rows(
                c"SELECT key_no, fingerprint FROM keypool.master_key ORDER BY key_no",
                |r| (r.get::<i32>(0) as u32, r.get::<Vec<u8>>(1)),
            );

            // Only accounts that live keys use take slots: those of removed keys give theirs
            // back once idle. An owned key's account is its own.
            let key_scopes: HashMap<i64, bool> = keys.iter().map(|k| (k.scope_id, k.owner.is_some())).collect();
            let scopes: Vec<_> = scopes.into_iter().filter(|s| key_scopes.contains_key(&s.0)).collect();
            let scope_ids: Vec<(i64, bool)> = scopes.iter().map(|s| (s.0, key_scopes[&s.0])).collect();
            let key_ids: Vec<(i64, bool)> = keys.iter().map(|k| (k.id, k.owner.is_some())).collect();
            let pool_ids: Vec<i64> = pools.iter().map(|p| p.id).collect();
            let scope_limits: HashMap<i64, Limits> = scopes.iter().map(|s| (s.0, s.1)).collect();
            let bound = registry::bind(
                sh,
                owner,
                Wanted {
                    scopes: &scope_ids,
                    keys: &key_ids,
                    pools: &pool_ids,
                },
                &live_databases,
                now,
                fit,
            );

            let mut cfg = Config {
                generation,
                owner,
                extension_owner,
                grants,
                scope_pools: HashMap::new(),
                pools: Vec::with_capacity(pools.len()),
                pools_by_name: HashMap::with_capacity(pools.len()),
                keys: Vec::with_capacity(keys.len()),
                keys_by_id: HashMap::with_capacity(keys.len()),
                scopes: Vec::with_capacity(scopes.len()),
                scopes_by_id: HashMap::with_capacity(scopes.len()),
            };
            for (id, limits, tz, disabled) in scopes {
                // Left out of shared memory (no room): its keys take no traffic.
                let Some(&slot) = bound.scopes.get(&id) else {
                    continue;
                };
                let tz = calendar::parse_zone(&tz).unwrap_or(Tz::UTC);
                let s = sh.scope(slot);
                {
                    let mut w = s.lock();
                    if w.tag().is(owner, id) && generation >= w.generation {
                        w.limits = limits;
                        w.generation = generation;
                    }
                }
                cfg.scopes_by_id.insert(id, cfg.scopes.len());
                cfg.scopes.push(Scope { id, slot, tz, disabled });
            }
            crate::catalog::failover::catch_up(sh, owner, &cfg.scopes);
            let mut pool_options = HashMap::new();
            for PoolRow {
                id,
                name,
                min_share,
                active_days,
                borrowing,
                timezone,
                fallback_on_quota,
                budget,
                owner_fallback,
                user_limits,
            } in pools
            {
                cfg.pools_by_name.insert(name.clone(), cfg.pools.len());
                pool_options.insert(id, (min_share, active_days, borrowing, timezone));
                cfg.pools.push(Pool {
                    id,
                    name,
                    slot: bound.pools[&id],
                    keys: Vec::new(),
                    tiers: Vec::new(),
                    policy: Policy {
                        capacity: None,
                        min_share: 0,
                        window_days: None,
                        borrowing: false,
                    },
                    token_capacity: None,
                    tz: Tz::UTC,
                    assign_fingerprint: 0,
                    owned: HashMap::new(),
                    owner_fallback,
                    fallbacks: Vec::new(),
                    fallback_on_quota,
                    budget,
                    user_limits,
                    minute_capacity: Capacity::default(),
                });
            }
            let pool_index: HashMap<i64, usize> = cfg.pools.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
            for (pool_id, fallback_id) in fallbacks {
                if let (Some(&p), Some(&f)) = (pool_index.get(&pool_id), pool_index.get(&fallback_id)) {
                    cfg.pools[p].fallbacks.push(f);
                }
            }
            // Users' own keys, by pool and owner (their tiers are built below).
            let mut owned: Vec<HashMap<String, Vec<usize>>> = vec![HashMap::new(); cfg.pools.len()];
            for k in keys {
                let (Some(&pool), Some(&scope), Some(&key_slot)) = (
                    pool_index.get(&k.pool_id),
                    cfg.scopes_by_id.get(&k.scope_id),
                    bound.keys.get(&k.id),
                ) else {
                    continue;
                };
                cfg.keys_by_id.insert(k.id, cfg.keys.len());
                match &k.owner {
                    None => cfg.pools[pool].keys.push(cfg.keys.len()),
                    Some(o) => owned[pool].entry(o.clone()).or_default().push(cfg.keys.len()),
                }
                let serves = cfg.scope_pools.entry(k.scope_id).or_default();
                if !serves.contains(&k.pool_id) {
                    serves.push(k.pool_id);
                }
                let price = prices
                    .get(&(k.provider.clone(), k.model.clone().unwrap_or_default()))
                    .or_else(|| prices.get(&(k.provider.clone(), String::new())))
                    .copied();
                cfg.keys.push(Key {
                    id: k.id,
                    price,
                    pool_id: k.pool_id,
                    scope,
                    slot: key_slot,
                    provider: k.provider,
                    model: k.model,
                    base_url: k.base_url,
                    secret: vault::open(&master_keys, k.id, &k.sealed),
                    label: k.label,
                    group_no: k.group_no,
                    priority: k.priority,
                    max_concurrent: (k.max_concurrent > 0).then_some(k.max_concurrent),
                    disabled: k.disabled,
                });
            }
            for (pool, owned) in cfg.pools.iter_mut().zip(owned) {
                pool.tiers = tiers(&cfg.keys, &pool.keys);
                pool.owned = owned.into_iter().map(|(o, ks)| (o, tiers(&cfg.keys, &ks))).collect();
            }
            for i in 0..cfg.pools.len() {
                let (min_share, active_days, borrowing, timezone) =
                    pool_options.remove(&cfg.pools[i].id).unwrap_or_default();
                let policy = pool_policy(&cfg, &cfg.pools[i], &scope_limits, min_share, active_days, borrowing);
                let pool_tz = pool_zone(&cfg, &cfg.pools[i], timezone.as_deref());
                let tokens = pool_capacity(&cfg, &cfg.pools[i], &scope_limits, |l| l.tpd);
                let minute = Capacity {
                    requests: pool_capacity(&cfg, &cfg.pools[i], &scope_limits, |l| l.rpm).unwrap_or(0),
                    tokens: pool_capacity(&cfg, &cfg.pools[i], &scope_limits, |l| l.tpm).unwrap_or(0),
                };
                let fingerprint = {
                    let mut h = std::hash::DefaultHasher::new();
                    for key in cfg.assignable(&cfg.pools[i]) {
                        std::hash::Hash::hash(&key.id, &mut h);
                    }
                    std::hash::Hasher::finish(&h)
                };
                let pool = &mut cfg.pools[i];
                pool.assign_fingerprint = fingerprint;
                pool.policy = policy;
                pool.tz = pool_tz;
                pool.token_capacity = tokens;
                pool.minute_capacity = minute;
            }
            cfg
        })
    })
}

struct PoolRow {
    id: i64,
    name: String,
    min_share: i32,
    active_days: Option<i32>,
    borrowing: bool,
    timezone: Option<String>,
    fallback_on_quota: bool,
    budget: Option<Budget>,
    owner_fallback: bool,
    user_limits: UserLimits,
}

struct KeyRow {
    id: i64,
    pool_id: i64,
    scope_id: i64,
    provider: String,
    model: Option<String>,
    base_url: String,
    sealed: Vec<u8>,
    label: String,
    group_no: i32,
    disabled: bool,
    priority: i32,
    owner: Option<String>,
    /// 0: no limit.
    max_concurrent: u32,
}

/// A pool's keys (in id order) grouped by priority, best first.
fn tiers(keys: &[Key], pool_keys: &[usize]) -> Vec<Tier> {
    let mut priorities: Vec<i32> = pool_keys.iter().map(|&k| keys[k].priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    priorities
        .into_iter()
        .map(|priority| Tier {
            priority,
            keys: pool_keys
                .iter()
                .copied()
                .filter(|&k| keys[k].priority == priority)
                .collect(),
        })
        .collect()
}

/// The sum of one daily limit over the distinct usable scopes of a pool; `None` when one of
/// them has no such limit.
fn pool_capacity(
    cfg: &Config,
    pool: &Pool,
    limits: &HashMap<i64, Limits>,
    daily: impl Fn(&Limits) -> u64,
) -> Option<u64> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for &k in &pool.keys {
        let key = &cfg.keys[k];
        if !cfg.usable(key) {
            continue;
        }
        let scope = cfg.scope_of(key);
        if !seen.insert(scope.id) {
            continue;
        }
        match limits.get(&scope.id).map(&daily) {
            Some(0) | None => return None,
            Some(v) => total = total.saturating_add(v),
        }
    }
    Some(total)
}

fn pool_policy(
    cfg: &Config,
    pool: &Pool,
    limits: &HashMap<i64, Limits>,
    min_share: i32,
    active_days: Option<i32>,
    borrowing: bool,
) -> Policy {
    Policy {
        capacity: pool_capacity(cfg, pool, limits, |l| l.rpd),
        min_share: min_share.max(0) as u64,
        window_days: active_days,
        borrowing,
    }
}

/// The pool's own time zone if it has one, else that of its keys when they all agree, else UTC.
fn pool_zone(cfg: &Config, pool: &Pool, explicit: Option<&str>) -> Tz {
    if let Some(tz) = explicit.and_then(calendar::parse_zone) {
        return tz;
    }
    let mut zones = pool.keys.iter().map(|&k| cfg.scope_of(&cfg.keys[k]).tz);
    match zones.next() {
        Some(first) if zones.all(|z| z == first) => first,
        _ => Tz::UTC,
    }
}
