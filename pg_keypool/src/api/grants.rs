//! `keypool_grant` and `keypool_revoke`, and the internal functions the views use to show each
//! role only what it may see. Who may do what is described in engine/access.rs.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::grants::{Grants, Privilege};
use crate::catalog::privilege;
use crate::engine::access::{grants, may_read_scope, pool_id, require_every_pool, role_name};
use crate::errors;

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
