//! The grants of a database (`keypool.pool_grant`): which role holds which privilege on which
//! pool, as loaded with the configuration (config.rs). The checks callers meet are in
//! engine/access.rs, the functions that change grants in api/grants.rs.

use std::collections::HashMap;

use pgrx::pg_sys;

use crate::catalog::privilege;
use crate::errors;

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
