//! API tokens for keypool-worker's own callers (LiteLLM calls them virtual keys): a token may be
//! bound to one user (it then always acts as that user) and to some pools (it reaches no other).
//!
//! A token is `kpt_` and 43 characters of base64url (32 random bytes). It is shown once, when
//! made; the table keeps only its SHA-256. The worker presents a token it received to
//! `keypool_authenticate_api_token`, the one function its role needs: it answers with the
//! token's user and pools, or nothing (unknown, revoked, expired).

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::OsRng;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use sha2::{Digest, Sha256};

use crate::api::admin::{check_cap, positive};
use crate::catalog::grants::Privilege;
use crate::catalog::privilege;
use crate::engine::access::{self};
use crate::engine::args::check_user_id;
use crate::errors::{self, Code};
use crate::state::clock;

/// Every token starts with this, so that logs, scanners and people recognise one.
pub const PREFIX: &str = "kpt_";
const RANDOM_BYTES: usize = 32;
const MAX_LABEL: usize = 200;
/// Longer strings are not tokens: refused before any work.
const MAX_TOKEN: usize = 200;

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding.
fn base64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(BASE64URL[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A new random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; RANDOM_BYTES];
    OsRng.fill_bytes(&mut bytes);
    format!("{PREFIX}{}", base64url(&bytes))
}

pub fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// `keypool_create_api_token(label, user_id, pools, expires_at, rpm, tpm, rpd, max_concurrent)`:
/// a new token, returned once; its limits hold across every worker (tokens.rs `limits_of`).
/// Needs `admin` on every pool it lists (on every pool, `'*'`, for a token bound to none).
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_create_api_token(
    label: Option<&str>,
    user_id: default!(Option<&str>, "NULL"),
    pools: default!(Option<Vec<Option<String>>>, "NULL"),
    expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    rpm: default!(Option<i32>, "NULL"),
    tpm: default!(Option<i64>, "NULL"),
    rpd: default!(Option<i32>, "NULL"),
    max_concurrent: default!(Option<i32>, "NULL"),
) -> String {
    let _path = privilege::pin_search_path();
    let rpm = positive("rpm", rpm);
    let tpm = positive("tpm", tpm);
    let rpd = positive("rpd", rpd);
    let max_concurrent = positive("max_concurrent", max_concurrent);
    let Some(label) = label else {
        errors::null_argument("label").raise()
    };
    if label.trim().is_empty() || label.len() > MAX_LABEL {
        errors::invalid(format!("label must be 1 to {MAX_LABEL} bytes long")).raise();
    }
    let user = user_id.map(|u| check_user_id(Some(u)).to_string());
    if let Some(at) = expires_at {
        if !at.is_finite() || clock::from_timestamptz(at) <= clock::real_now_ms() {
            errors::invalid("expires_at must be a time in the future").raise();
        }
    }
    let grants = access::grants();
    let pool_ids: Option<Vec<i64>> = match pools {
        None => {
            access::require_every_pool(&grants, "make tokens for every pool", Privilege::Admin);
            None
        }
        Some(names) => {
            if names.is_empty() || names.len() > 1000 {
                errors::invalid("pools must name 1 to 1000 pools, or be NULL for every pool").raise();
            }
            let mut ids = Vec::with_capacity(names.len());
            for name in &names {
                let Some(name) = name.as_deref() else {
                    errors::null_argument("a pool in pools").raise()
                };
                ids.push(access::pool_id(&grants, name, Privilege::Admin));
            }
            ids.sort_unstable();
            ids.dedup();
            Some(ids)
        }
    };
    let token = new_token();
    let caller = privilege::caller();
    privilege::spi_as_owner(grants.owner, |client| {
        let id: i64 = errors::spi(client.update(
            "INSERT INTO keypool.api_token (label, user_id, pool_ids, token_sha256, created_by, expires_at,
                                             rpm, tpm, rpd, max_concurrent)
             VALUES ($1, $2, $3, $4, $5::oid::regrole, $6, $7::integer, $8, $9::integer, $10::integer) RETURNING id",
            None,
            &[
                label.into(),
                user.clone().into(),
                pool_ids.clone().into(),
                digest(&token).into(),
                caller.into(),
                expires_at.into(),
                rpm.into(),
                tpm.into(),
                rpd.into(),
                max_concurrent.into(),
            ],
        ))
        .first()
        .get_one::<i64>()
        .ok()
        .flatten()
        .unwrap_or(0);
        errors::spi(
            client.update(
                "INSERT INTO keypool.event (at, kind, pool_id, reason) VALUES ($1, 'api_token_created', $2, $3)",
                None,
                &[
                    clock::to_timestamptz(clock::now_ms()).into(),
                    pool_ids.as_ref().and_then(|p| p.first().copied()).into(),
                    format!(
                        "token {id} ({label}) for {} on {} by {}",
                        user.as_deref().map_or("any user".to_string(), |u| format!("user {u}")),
                        if pool_ids.is_some() { "its pools" } else { "every pool" },
                        access::role_name(caller)
                    )
                    .into(),
                ],
            ),
        );
    });
    token_limits_changed();
    token
}

/// Whether the caller may manage a token: it made it (or acts for the role that did), or it
/// administers every pool the token lists (every pool, for a token bound to none).
fn may_manage(
    grants: &crate::catalog::grants::Grants,
    caller: pg_sys::Oid,
    created_by: pg_sys::Oid,
    pools: &Option<Vec<i64>>,
) -> bool {
    if unsafe { pg_sys::has_privs_of_role(caller, created_by) } {
        return true;
    }
    match pools {
        None => grants.allows(caller, None, Privilege::Admin),
        Some(ids) => ids.iter().all(|&id| grants.allows(caller, Some(id), Privilege::Admin)),
    }
}

/// `keypool_alter_api_token(id, rpm, tpm, rpd, max_concurrent)`: changes a token's limits
/// (NULL: unchanged, 0: none); by the role that made it or an administrator of its pools.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_alter_api_token(
    id: Option<i64>,
    rpm: default!(Option<i32>, "NULL"),
    tpm: default!(Option<i64>, "NULL"),
    rpd: default!(Option<i32>, "NULL"),
    max_concurrent: default!(Option<i32>, "NULL"),
) {
    let _path = privilege::pin_search_path();
    let Some(id) = id else {
        errors::null_argument("id").raise()
    };
    let limits = [
        check_cap("rpm", rpm.map(i64::from)),
        check_cap("tpm", tpm),
        check_cap("rpd", rpd.map(i64::from)),
        check_cap("max_concurrent", max_concurrent.map(i64::from)),
    ];
    let grants = access::grants();
    let caller = privilege::caller();
    privilege::spi_as_owner(grants.owner, |client| {
        managed(client, &grants, caller, id);
        let given = |i: usize| limits[i].is_some();
        let value = |i: usize| limits[i].flatten();
        errors::spi(client.update(
            "UPDATE keypool.api_token SET
                 rpm = CASE WHEN $2 THEN $3::integer ELSE rpm END,
                 tpm = CASE WHEN $4 THEN $5 ELSE tpm END,
                 rpd = CASE WHEN $6 THEN $7::integer ELSE rpd END,
                 max_concurrent = CASE WHEN $8 THEN $9::integer ELSE max_concurrent END
              WHERE id = $1",
            None,
            &[
                id.into(),
                given(0).into(),
                value(0).into(),
                given(1).into(),
                value(1).into(),
                given(2).into(),
                value(2).into(),
                given(3).into(),
                value(3).into(),
            ],
        ));
    });
    token_limits_changed();
}

/// The token's creator and pools, when the caller may manage it; raises otherwise (42704 to
/// those who would see every token, 42501 to others, saying nothing about the token).
fn managed(
    client: &mut pgrx::spi::SpiClient<'_>,
    grants: &crate::catalog::grants::Grants,
    caller: pg_sys::Oid,
    id: i64,
) -> (pg_sys::Oid, Option<Vec<i64>>) {
    let row = {
        let t = errors::spi(client.update(
            "SELECT created_by::oid, pool_ids FROM keypool.api_token WHERE id = $1 FOR UPDATE",
            None,
            &[id.into()],
        ));
        if t.is_empty() {
            None
        } else {
            let t = t.first();
            Some((
                t.get::<pg_sys::Oid>(1).ok().flatten().unwrap_or(pg_sys::Oid::INVALID),
                t.get::<Vec<i64>>(2).ok().flatten(),
            ))
        }
    };
    match row {
        Some((created_by, pools)) if may_manage(grants, caller, created_by, &pools) => (created_by, pools),
        None if grants.allows(caller, None, Privilege::Admin) => {
            errors::undefined(format!("API token {id} does not exist")).raise()
        }
        _ => errors::error(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for API token {id}"),
        )
        .hint("A token is changed or revoked by the role that made it, or by an administrator of its pools.")
        .raise(),
    }
}

fn token_limits_changed() {
    crate::catalog::api_tokens::changed(crate::state::shmem::shared());
}

/// `keypool_revoke_api_token(id)`: the token stops working (within seconds on every worker).
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_revoke_api_token(id: Option<i64>) {
    let _path = privilege::pin_search_path();
    let Some(id) = id else {
        errors::null_argument("id").raise()
    };
    let grants = access::grants();
    let caller = privilege::caller();
    privilege::spi_as_owner(grants.owner, |client| {
        managed(client, &grants, caller, id);
        errors::spi(client.update(
            "UPDATE keypool.api_token SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            None,
            &[id.into()],
        ));
        errors::spi(client.update("SELECT pg_notify('keypool_api_tokens', $1::text)", None, &[id.into()]));
    });
    token_limits_changed();
}

/// The columns both authentication functions answer with (pgrx needs them spelled out in the
/// signatures).
type Authenticated = TableIterator<
    'static,
    (
        name!(token_id, i64),
        name!(user_id, Option<String>),
        name!(pools, Option<Vec<String>>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
>;

/// `keypool_authenticate_api_token(token)`: the token's id, user and pools when it is valid
/// (known, not revoked, not expired); no row otherwise. The worker uses
/// `keypool_authenticate_api_token_sha256`, so that no token reaches a server log.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn keypool_authenticate_api_token(
    token: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(token_id, i64),
        name!(user_id, Option<String>),
        name!(pools, Option<Vec<String>>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let _path = privilege::pin_search_path();
    let Some(token) = token.filter(|t| t.starts_with(PREFIX) && t.len() <= MAX_TOKEN) else {
        return TableIterator::new(Vec::new());
    };
    authenticate(digest(token))
}

/// `keypool_authenticate_api_token_sha256(token_sha256)`: as `keypool_authenticate_api_token`,
/// given the token's SHA-256 (32 bytes) instead of the token. A bind parameter may be logged
/// (`log_statement`, `log_min_duration_statement`); a digest in a log opens nothing.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn keypool_authenticate_api_token_sha256(
    token_sha256: Option<&[u8]>,
) -> TableIterator<
    'static,
    (
        name!(token_id, i64),
        name!(user_id, Option<String>),
        name!(pools, Option<Vec<String>>),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let _path = privilege::pin_search_path();
    let Some(digest) = token_sha256.filter(|d| d.len() == 32) else {
        return TableIterator::new(Vec::new());
    };
    authenticate(digest.to_vec())
}

fn authenticate(digest: Vec<u8>) -> Authenticated {
    let owner = access::grants().owner;
    let rows = privilege::spi_as_owner(owner, |client| {
        let t = errors::spi(client.update(
            "WITH hit AS (
                 SELECT t.id, t.user_id, t.pool_ids, t.expires_at
                   FROM keypool.api_token t
                  WHERE t.token_sha256 = $1 AND t.revoked_at IS NULL
                    AND (t.expires_at IS NULL OR t.expires_at > now())
             ), used AS (
                 UPDATE keypool.api_token t SET last_used_at = now()
                   FROM hit WHERE t.id = hit.id AND (t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute')
             )
             SELECT hit.id, hit.user_id,
                    CASE WHEN hit.pool_ids IS NOT NULL THEN
                        coalesce((SELECT array_agg(p.name ORDER BY p.name) FROM keypool.pool p WHERE p.id = ANY (hit.pool_ids)),
                                 '{}'::text[])
                    END,
                    hit.expires_at
               FROM hit",
            None,
            &[digest.into()],
        ));
        t.filter_map(|r| {
            Some((
                r.get::<i64>(1).ok().flatten()?,
                r.get::<String>(2).ok().flatten(),
                r.get::<Vec<String>>(3).ok().flatten(),
                r.get::<TimestampWithTimeZone>(4).ok().flatten(),
            ))
        })
        .collect::<Vec<_>>()
    });
    TableIterator::new(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_the_standard_alphabet_without_padding() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff, 0xbf]), "-_-_");
    }

    #[test]
    fn tokens_are_prefixed_random_and_long_enough() {
        let a = new_token();
        let b = new_token();
        assert!(a.starts_with(PREFIX));
        assert_eq!(a.len(), PREFIX.len() + 43);
        assert_ne!(a, b);
        assert_eq!(digest(&a).len(), 32);
    }
}
