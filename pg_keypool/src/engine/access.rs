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

use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::config::{self, Config, Key, Pool};
use crate::catalog::privilege;
use crate::errors::{self, Code};
use crate::state::shmem;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    Use,
    Read,
    Admin,
}

impl Privilege {
    /// What a grant of this privilege allows, as bits (`admin` includes the others).
    fn grant_bits(self) -> u8 {
        match self {
            Privilege::Use => 1,
            Privilege::Read => 2,
            Privilege::Admin => 7,
        }
    }

    /// The bit a check for this privilege needs.
    fn need_bit(self) -> u8 {
        match self {
            Privilege::Use => 1,
            Privilege::Read => 2,
            Privilege::Admin => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Privilege::Use => "use",
            Privilege::Read => "read",
            Privilege::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Privilege> {
        match s {
            "use" => Some(Privilege::Use),
            "read" => Some(Privilege::Read),
            "admin" => Some(Privilege::Admin),
            _ => None,
        }
    }
}

/// The grants of this database, as loaded with the configuration.
#[derive(Default)]
pub struct Grants {
    /// The extension's owner: needs no grant.
    pub owner: pg_sys::Oid,
    /// Grants on every pool: (grantee, bits).
    pub every_pool: Vec<(pg_sys::Oid, u8)>,
    /// Grants per pool id.
    pub by_pool: HashMap<i64, Vec<(pg_sys::Oid, u8)>>,
}

impl Grants {
    /// Builds the grants from `(pool id or NULL for every pool, grantee, privilege)` rows.
    pub fn from_rows(owner: pg_sys::Oid, rows: impl IntoIterator<Item = (Option<i64>, pg_sys::Oid, String)>) -> Self {
        let mut g = Grants {
            owner,
            ..Default::default()
        };
        for (pool, grantee, privilege) in rows {
            let Some(p) = Privilege::parse(&privilege) else {
                continue;
            };
            let list = match pool {
                None => &mut g.every_pool,
                Some(id) => g.by_pool.entry(id).or_default(),
            };
            match list.iter_mut().find(|(r, _)| *r == grantee) {
                Some((_, bits)) => *bits |= p.grant_bits(),
                None => list.push((grantee, p.grant_bits())),
            }
        }
        g
    }

    /// Whether `role` may act as the extension's owner (superusers may).
    pub fn unrestricted(&self, role: pg_sys::Oid) -> bool {
        unsafe { pg_sys::has_privs_of_role(role, self.owner) }
    }

    /// Whether `role` holds `p` on pool `pool`, or on every pool when `pool` is `None`.
    pub fn allows(&self, role: pg_sys::Oid, pool: Option<i64>, p: Privilege) -> bool {
        if self.unrestricted(role) {
            return true;
        }
        let bit = p.need_bit();
        let holds = |list: &[(pg_sys::Oid, u8)]| {
            list.iter()
                .any(|&(grantee, bits)| bits & bit != 0 && unsafe { pg_sys::has_privs_of_role(role, grantee) })
        };
        holds(&self.every_pool) || pool.and_then(|id| self.by_pool.get(&id)).is_some_and(|l| holds(l))
    }
}

/// Loads the grants with a query (for functions that run without shared memory).
pub fn load(owner: pg_sys::Oid) -> Grants {
    let rows = privilege::spi_as_owner(owner, |client| {
        let table = errors::spi(client.select(
            "SELECT pool_id, grantee::oid, privilege FROM keypool.pool_grant",
            None,
            &[],
        ));
        table
            .map(|r| {
                (
                    r.get::<i64>(1).ok().flatten(),
                    r.get::<pg_sys::Oid>(2).ok().flatten().unwrap_or(pg_sys::Oid::INVALID),
                    r.get::<String>(3).ok().flatten().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    });
    Grants::from_rows(owner, rows)
}

/// This database's grants: from the configuration cache when the library is preloaded,
/// otherwise read now.
pub fn grants() -> Rc<Grants> {
    if shmem::try_shared().is_some() {
        config::current().grants.clone()
    } else {
        Rc::new(load(config::extension_owner()))
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

fn privilege_arg(privilege: Option<&str>) -> Privilege {
    let Some(name) = privilege else {
        errors::null_argument("privilege").raise()
    };
    Privilege::parse(name).unwrap_or_else(|| {
        errors::invalid(format!("unknown privilege \"{name}\""))
            .hint("Privileges are use, read and admin.")
            .raise()
    })
}

/// The pool a grant is about: `None` for every pool (`'*'`). Checks that the caller is an
/// administrator of it.
fn grant_target(grants: &Grants, pool: Option<&str>) -> Option<i64> {
    let Some(pool) = pool else {
        errors::null_argument("pool").raise()
    };
    if pool == "*" {
        require_every_pool(grants, "grant on every pool", Privilege::Admin);
        None
    } else {
        Some(pool_id(grants, pool, Privilege::Admin))
    }
}

fn grantee_arg(grantee: Option<pg_sys::Oid>) -> pg_sys::Oid {
    match grantee {
        Some(oid) if oid != pg_sys::Oid::INVALID => oid,
        _ => errors::null_argument("grantee").raise(),
    }
}

fn record_grant_event(grants: &Grants, kind: &str, pool_id: Option<i64>, reason: &str) {
    privilege::spi_as_owner(grants.owner, |client| {
        errors::spi(client.update(
            "INSERT INTO keypool.event (at, kind, pool_id, reason) VALUES ($1, $2, $3, $4)",
            None,
            &[
                crate::state::clock::to_timestamptz(crate::state::clock::now_ms()).into(),
                kind.into(),
                pool_id.into(),
                reason.into(),
            ],
        ));
    });
}

pub fn role_name(oid: pg_sys::Oid) -> String {
    let name = unsafe { pg_sys::GetUserNameFromId(oid, true) };
    if name.is_null() {
        format!("role {}", oid.to_u32())
    } else {
        unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
    }
}

/// A change to the grants: giving a privilege, or taking it back.
#[derive(Clone, Copy)]
enum GrantChange {
    Grant,
    Revoke,
}

/// Grants or revokes `privilege` on `pool` for `grantee`, after checking that the caller
/// administers the pool; records an event when something changed.
fn change_grant(change: GrantChange, pool: Option<&str>, grantee: Option<pg_sys::Oid>, privilege: Option<&str>) {
    let _path = privilege::pin_search_path();
    let p = privilege_arg(privilege);
    let grantee = grantee_arg(grantee);
    let grants = grants();
    let target = grant_target(&grants, pool);
    let caller = privilege::caller();
    let sql = match change {
        GrantChange::Grant => {
            "INSERT INTO keypool.pool_grant (pool_id, grantee, privilege, granted_by)
             VALUES ($1, $2::oid::regrole, $3, $4::oid::regrole)
             ON CONFLICT (pool_id, grantee, privilege) DO NOTHING RETURNING 1"
        }
        GrantChange::Revoke => {
            "DELETE FROM keypool.pool_grant
              WHERE pool_id IS NOT DISTINCT FROM $1 AND grantee = $2::oid::regrole AND privilege = $3
              RETURNING 1"
        }
    };
    let mut args: Vec<pgrx::datum::DatumWithOid<'_>> = vec![target.into(), grantee.into(), p.as_str().into()];
    if matches!(change, GrantChange::Grant) {
        args.push(caller.into());
    }
    let changed = privilege::spi_as_owner(grants.owner, |client| {
        !errors::spi(client.update(sql, None, &args)).is_empty()
    });
    if changed {
        let (kind, preposition) = match change {
            GrantChange::Grant => ("granted", "to"),
            GrantChange::Revoke => ("revoked", "from"),
        };
        record_grant_event(
            &grants,
            kind,
            target,
            &format!(
                "{} on {} {preposition} {} by {}",
                p.as_str(),
                pool.unwrap_or("*"),
                role_name(grantee),
                role_name(caller)
            ),
        );
    }
}

/// `keypool_grant(pool, grantee, privilege)`: lets `grantee` (and the roles that have its
/// privileges) use, read or administer a pool, or every pool with `'*'`. Needs `admin` on the
/// pool (on every pool for `'*'`). Granting what is granted already changes nothing.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION keypool_grant(pool text, grantee regrole, privilege text DEFAULT 'use') RETURNS void
           LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'keypool_grant_wrapper';"
)]
fn keypool_grant(pool: Option<&str>, grantee: Option<pg_sys::Oid>, privilege: default!(Option<&str>, "'use'")) {
    change_grant(GrantChange::Grant, pool, grantee, privilege);
}

/// `keypool_revoke(pool, grantee, privilege)`: takes back what `keypool_grant` gave. Needs the
/// same rights as granting it.
#[pg_extern(
    volatile,
    parallel_unsafe,
    sql = "CREATE FUNCTION keypool_revoke(pool text, grantee regrole, privilege text DEFAULT 'use') RETURNS void
           LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'keypool_revoke_wrapper';"
)]
fn keypool_revoke(pool: Option<&str>, grantee: Option<pg_sys::Oid>, privilege: default!(Option<&str>, "'use'")) {
    change_grant(GrantChange::Revoke, pool, grantee, privilege);
}

/// Internal functions the views use to show each role only what it may see.
#[pg_schema]
mod keypool {
    use pgrx::pg_sys;
    use pgrx::prelude::*;

    use super::{grants, may_read_scope, Privilege};
    use crate::catalog::config;
    use crate::catalog::privilege;

    /// Whether the calling role holds `privilege` on pool `pool_id` (NULL: on every pool).
    #[pg_extern(stable, parallel_unsafe)]
    fn allowed(pool_id: Option<i64>, privilege: Option<&str>) -> bool {
        let Some(p) = privilege.and_then(Privilege::parse) else {
            return false;
        };
        grants().allows(privilege::caller(), pool_id, p)
    }

    /// Whether the calling role may read scope `scope_id` (it serves a pool the role may read).
    #[pg_extern(stable, parallel_unsafe)]
    fn scope_readable(scope_id: Option<i64>) -> bool {
        let Some(scope_id) = scope_id else { return false };
        let caller = privilege::caller();
        if crate::state::shmem::try_shared().is_none() {
            return grants().allows(caller, None, Privilege::Read);
        }
        may_read_scope(&config::current(), caller, scope_id)
    }

    /// Whether the calling role has the privileges of role `role` (acts for it).
    #[pg_extern(stable, parallel_unsafe)]
    fn acts_for(role: Option<pg_sys::Oid>) -> bool {
        role.is_some_and(|r| unsafe { pg_sys::has_privs_of_role(privilege::caller(), r) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_includes_use_and_read() {
        let a = Privilege::Admin.grant_bits();
        for p in [Privilege::Use, Privilege::Read, Privilege::Admin] {
            assert_ne!(a & p.need_bit(), 0, "{p:?}");
        }
        assert_eq!(Privilege::Use.grant_bits() & Privilege::Read.need_bit(), 0);
        assert_eq!(Privilege::Read.grant_bits() & Privilege::Use.need_bit(), 0);
        assert_eq!(Privilege::Use.grant_bits() & Privilege::Admin.need_bit(), 0);
    }

    #[test]
    fn privileges_parse_by_name_only() {
        assert_eq!(Privilege::parse("use"), Some(Privilege::Use));
        assert_eq!(Privilege::parse("admin"), Some(Privilege::Admin));
        assert_eq!(Privilege::parse("ADMIN"), None);
        assert_eq!(Privilege::parse(""), None);
    }
}
