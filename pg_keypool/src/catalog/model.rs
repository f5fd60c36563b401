//! The configuration as each backend caches it (config.rs loads it): pools with their tiers of
//! keys, keys, quota scopes, and the grants, with the look-ups the hot path needs.

use std::collections::HashMap;
use std::rc::Rc;

use chrono_tz::Tz;
use pgrx::pg_sys;
use zeroize::Zeroizing;

use crate::catalog::grants::Grants;
use crate::policy::calendar;
use crate::policy::minute::{Capacity, UserLimits};
use crate::policy::money::{Budget, Price};
use crate::policy::shares::Policy;
use crate::state::slots::Owner;

pub struct Pool {
    pub id: i64,
    pub name: String,
    pub slot: u32,
    /// Indexes into `Config::keys`, by key id.
    pub keys: Vec<usize>,
    /// The same keys by priority, best first (each tier in key id order).
    pub tiers: Vec<Tier>,
    /// How the pool's daily capacity is shared among its users.
    pub policy: Policy,
    /// Tokens per day over the usable scopes, when every one of them has that limit.
    pub token_capacity: Option<u64>,
    /// The time zone of its users' daily reset.
    pub tz: Tz,
    /// Identifies the set of keys that take new users (engine/key_tree.rs rebuilds its tree when it
    /// changes).
    pub assign_fingerprint: u64,
    /// Users' own keys (`owner`), by owner, in tiers; `keys` and `tiers` hold the shared keys
    /// only, so that owned keys add nothing to the pool's capacity, shares or assignment.
    pub owned: HashMap<String, Vec<Tier>>,
    /// Whether an owner whose own keys are all at their limits falls back to the shared keys.
    pub owner_fallback: bool,
    /// The fallback chain: indexes into `Config::pools`, in order (fallbacks.rs).
    pub fallbacks: Vec<usize>,
    /// Whether a user past their share here goes on down the chain.
    pub fallback_on_quota: bool,
    /// The spend budget, if any (budgets.rs).
    pub budget: Option<Budget>,
    /// Limits on each user's minute (policy/minute.rs).
    pub user_limits: UserLimits,
    /// Requests and tokens per minute over its usable shared keys (0: a key without that limit).
    pub minute_capacity: Capacity,
}

/// The keys of one priority in a pool.
pub struct Tier {
    pub priority: i32,
    pub keys: Vec<usize>,
}

impl Pool {
    /// Today for the pool's users: day number, start and end.
    pub fn day(&self, now_ms: i64) -> (i32, i64, i64) {
        calendar::day_of(self.tz, now_ms)
    }
}

pub struct Key {
    pub id: i64,
    pub pool_id: i64,
    pub scope: usize,
    pub slot: u32,
    pub provider: String,
    pub model: Option<String>,
    pub base_url: String,
    /// The plaintext secret, opened from its sealed form when the cache was loaded; wiped from
    /// memory when the cache is dropped.
    pub secret: Zeroizing<String>,
    pub label: String,
    pub group_no: i32,
    /// Lower is preferred (see `Pool::tiers`).
    pub priority: i32,
    /// The price of its provider's model (`keypool_prices`), if one is set.
    pub price: Option<Price>,
    /// Most reservations it may have open at once (`keypool_add_key(..., max_concurrent)`).
    pub max_concurrent: Option<u32>,
    pub disabled: bool,
}

pub struct Scope {
    pub id: i64,
    pub slot: u32,
    pub tz: Tz,
    pub disabled: bool,
}

pub struct Config {
    pub generation: u64,
    pub owner: Owner,
    pub extension_owner: pg_sys::Oid,
    /// Who may use, read and administer which pool (access.rs).
    pub grants: Rc<Grants>,
    /// The pools each scope serves (through keys that are not removed).
    pub scope_pools: HashMap<i64, Vec<i64>>,
    pub pools: Vec<Pool>,
    pub pools_by_name: HashMap<String, usize>,
    pub keys: Vec<Key>,
    pub keys_by_id: HashMap<i64, usize>,
    pub scopes: Vec<Scope>,
    pub scopes_by_id: HashMap<i64, usize>,
}

impl Config {
    pub fn pool_by_name(&self, name: &str) -> Option<&Pool> {
        self.pools_by_name.get(name).map(|&i| &self.pools[i])
    }

    pub fn key_by_id(&self, id: i64) -> Option<&Key> {
        self.keys_by_id.get(&id).map(|&i| &self.keys[i])
    }

    pub fn scope_by_id(&self, id: i64) -> Option<&Scope> {
        self.scopes_by_id.get(&id).map(|&i| &self.scopes[i])
    }

    pub fn scope_of(&self, key: &Key) -> &Scope {
        &self.scopes[key.scope]
    }

    /// Neither the key nor its account is disabled.
    pub fn usable(&self, key: &Key) -> bool {
        !key.disabled && !self.scope_of(key).disabled
    }

    /// The keys that take new users: the usable keys of the pool's best priority among its
    /// usable keys, in id order. Users go to worse tiers only at reservation time, while the
    /// best tier is at its limits.
    pub fn assignable<'c>(&'c self, pool: &'c Pool) -> impl Iterator<Item = &'c Key> + 'c {
        let usable = move |&&k: &&usize| self.usable(&self.keys[k]);
        let best = pool.tiers.iter().find(|t| t.keys.iter().any(|k| usable(&k)));
        best.into_iter()
            .flat_map(|t| t.keys.iter())
            .filter(usable)
            .map(|&k| &self.keys[k])
    }
}
