//! Who may do what with which pool.
//!
//! Three privileges, granted per pool or on every pool (`'*'`, present and future) with
//! `keypool_grant(pool, role, privilege)`:
//! - `use`: reserve, and settle or release one's own reservations; a user's allocation and
//!   `can_request`; submitting requests and reading one's own results; assigning users (the
//!   signup trigger, `keypool_assign`, backfill) and their weights;
//! - `read`: the pool's rows in the stats views and the usage report;
//! - `admin`: everything else about the pool (keys, settings, resets, enabling and disabling,
//!   settling others' reservations, granting on it); `admin` includes `use` and `read`.
//!
//! A role holds a privilege when it has the privileges of a role it was granted to (PostgreSQL's
//! `has_privs_of_role`: itself, or a role it is a member of and inherits from). Superusers and
//! the extension's owner need no grant. Every refusal is SQLSTATE 42501 and names only what the
//! caller named: a pool the caller may not see and a pool that does not exist get the same
//! answer, so names do not leak; only a role with the privilege on every pool learns that a pool
//! does not exist.

use std::rc::Rc;

use pgrx::pg_sys;

use crate::catalog::config::{self};
use crate::catalog::model::{Config, Key, Pool};
use crate::catalog::privilege;
use crate::errors::{self, Code};
use crate::state::shmem;

use crate::catalog::grants::{self, Grants, Privilege};

/// This database's grants: from the configuration cache when the library is preloaded,
/// otherwise read now.
pub fn grants() -> Rc<Grants> {
    if shmem::try_shared().is_some() {
        config::current().grants.clone()
    } else {
        Rc::new(grants::load(crate::catalog::privilege::extension_owner()))
    }
}

/// The refusal of a privilege on a pool. It names only what the caller named, whether the pool
/// exists or not.
pub fn denied_pool(pool: &str, p: Privilege) -> ! {
    errors::error(
        Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied for pool \"{pool}\""),
    )
    .detail(format!("The {} privilege on the pool is needed.", p.as_str()))
    .hint(format!(
        "An administrator of the pool can grant it: SELECT keypool_grant('{}', '<role>', '{}');",
        pool.replace('\'', "''"),
        p.as_str()
    ))
    .raise()
}

/// The refusal of a privilege on every pool.
pub fn denied_every_pool(what: &str, p: Privilege) -> ! {
    errors::error(
        Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied to {what}"),
    )
    .detail(format!("The {} privilege on every pool ('*') is needed.", p.as_str()))
    .hint(format!(
        "An administrator of every pool can grant it: SELECT keypool_grant('*', '<role>', '{}');",
        p.as_str()
    ))
    .raise()
}

/// The refusal of a privilege on a key's pool: the same whether the key exists or not.
pub fn denied_key(key_id: i64, p: Privilege) -> ! {
    errors::error(
        Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied for key {key_id}"),
    )
    .detail(format!("The {} privilege on the key's pool is needed.", p.as_str()))
    .hint("An administrator of the pool can grant it with keypool_grant(pool, role, privilege).")
    .raise()
}

/// Checks that the caller holds `p` on every pool.
pub fn require_every_pool(grants: &Grants, what: &str, p: Privilege) {
    if !grants.allows(privilege::caller(), None, p) {
        denied_every_pool(what, p);
    }
}

/// Resolves a pool the caller holds `p` on, from the cached configuration.
pub fn pool<'c>(cfg: &'c Config, name: &str, p: Privilege) -> &'c Pool {
    let caller = privilege::caller();
    match cfg.pool_by_name(name) {
        Some(pool) if cfg.grants.allows(caller, Some(pool.id), p) => pool,
        None if cfg.grants.allows(caller, None, p) => errors::undefined(format!("pool \"{name}\" does not exist"))
            .hint("Create it with keypool_create_pool().")
            .raise(),
        _ => denied_pool(name, p),
    }
}

/// Resolves a pool the caller holds `p` on by a query (works without shared memory); returns
/// its id.
pub fn pool_id(grants: &Grants, name: &str, p: Privilege) -> i64 {
    let id: Option<i64> = privilege::spi_as_owner(grants.owner, |client| {
        let t = errors::spi(client.select("SELECT id FROM keypool.pool WHERE name = $1", None, &[name.into()]));
        t.into_iter().next().and_then(|r| r.get::<i64>(1).ok().flatten())
    });
    let caller = privilege::caller();
    match id {
        Some(id) if grants.allows(caller, Some(id), p) => id,
        None if grants.allows(caller, None, p) => errors::undefined(format!("pool \"{name}\" does not exist"))
            .hint("Create it with keypool_create_pool().")
            .raise(),
        _ => denied_pool(name, p),
    }
}

/// Every pool `role` holds `p` on: (id, name), in id order.
pub fn pools_with(grants: &Grants, role: pg_sys::Oid, p: Privilege) -> Vec<(i64, String)> {
    let pools: Vec<(i64, String)> = privilege::spi_as_owner(grants.owner, |client| {
        let t = errors::spi(client.select("SELECT id, name FROM keypool.pool ORDER BY id", None, &[]));
        t.filter_map(|r| Some((r.get::<i64>(1).ok().flatten()?, r.get::<String>(2).ok().flatten()?)))
            .collect()
    });
    pools
        .into_iter()
        .filter(|(id, _)| grants.allows(role, Some(*id), p))
        .collect()
}

/// Checks that the caller holds `p` on the pool of key `key_id` (any key, removed ones
/// included); returns the key's pool id.
pub fn key_pool(grants: &Grants, key_id: i64, p: Privilege) -> i64 {
    let pool: Option<i64> = privilege::spi_as_owner(grants.owner, |client| {
        let t = errors::spi(client.select("SELECT pool_id FROM keypool.key WHERE id = $1", None, &[key_id.into()]));
        t.into_iter().next().and_then(|r| r.get::<i64>(1).ok().flatten())
    });
    let caller = privilege::caller();
    match pool {
        Some(id) if grants.allows(caller, Some(id), p) => id,
        None if grants.allows(caller, None, p) => errors::undefined(format!("key {key_id} does not exist")).raise(),
        _ => denied_key(key_id, p),
    }
}

/// The cached key `key_id` if the caller holds `p` on its pool.
pub fn key(cfg: &Config, key_id: i64, p: Privilege) -> &Key {
    let caller = privilege::caller();
    match cfg.key_by_id(key_id) {
        Some(k) if cfg.grants.allows(caller, Some(k.pool_id), p) => k,
        None if cfg.grants.allows(caller, None, p) => errors::undefined(format!("key {key_id} does not exist")).raise(),
        _ => denied_key(key_id, p),
    }
}

/// Whether the caller may read scope `scope_id`: it serves a pool the caller may read (the
/// scopes of removed keys only, to readers of every pool).
pub fn may_read_scope(cfg: &Config, caller: pg_sys::Oid, scope_id: i64) -> bool {
    if cfg.grants.allows(caller, None, Privilege::Read) {
        return true;
    }
    cfg.scope_pools.get(&scope_id).is_some_and(|pools| {
        pools
            .iter()
            .any(|&p| cfg.grants.allows(caller, Some(p), Privilege::Read))
    })
}

pub fn role_name(oid: pg_sys::Oid) -> String {
    let name = unsafe { pg_sys::GetUserNameFromId(oid, true) };
    if name.is_null() {
        format!("role {}", oid.to_u32())
    } else {
        unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
    }
}
