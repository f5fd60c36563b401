//! Keys that a provider's answer disabled (an invalid key, or its account out of billing) are
//! checked again by the workers, on a back-off schedule, and enabled when the provider accepts
//! them: `keypool_recheck_due` hands a worker the keys whose check is due (claimed for a few
//! minutes, so that several workers never check one key at once), `keypool_recheck_result`
//! records what the provider said. Keys an operator disabled are never rechecked.

use pgrx::datum::Interval;
use pgrx::prelude::*;

use crate::api::admin;
use crate::catalog::config;
use crate::catalog::grants::Privilege;
use crate::catalog::privilege;
use crate::engine::access;
use crate::errors;

/// How long a claimed check keeps other workers off the key.
const CLAIM: &str = "5 minutes";
/// Most keys one call hands out.
const MAX_CLAIM: i32 = 100;
/// Longest detail recorded with a check.
const MAX_DETAIL: usize = 300;

fn interval_ms(i: Interval) -> i64 {
    let i = i.into_inner();
    (i.month as i64 * 30 + i.day as i64) * 86_400_000 + i.time / 1000
}

/// `keypool_recheck_due(after, max_n)`: up to `max_n` keys disabled by a provider's answer whose
/// check is due (first `after` their disabling, then when the last check said), in pools the
/// caller may use, each with what a check needs (its secret, as a reservation carries it);
/// claimed for a few minutes.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn keypool_recheck_due(
    after: Option<Interval>,
    max_n: default!(Option<i32>, 10),
) -> TableIterator<
    'static,
    (
        name!(key_id, i64),
        name!(provider, String),
        name!(model, Option<String>),
        name!(base_url, String),
        name!(secret, Option<String>),
        name!(rechecks, i32),
    ),
> {
    let _path = privilege::pin_search_path();
    let Some(after) = after else {
        errors::null_argument("after").raise()
    };
    let after_ms = interval_ms(after);
    if after_ms < 0 {
        errors::invalid("after must not be negative").raise();
    }
    let max_n = max_n.unwrap_or(10).clamp(1, MAX_CLAIM);
    let cfg = config::current();
    let caller = privilege::caller();
    let pools: Vec<i64> = cfg
        .pools
        .iter()
        .filter(|p| cfg.grants.allows(caller, Some(p.id), Privilege::Use))
        .map(|p| p.id)
        .collect();
    if pools.is_empty() {
        return TableIterator::new(Vec::new());
    }
    let claimed: Vec<(i64, i32)> = privilege::spi_as_owner(cfg.extension_owner, |client| {
        let t = errors::spi(client.update(
            &format!(
                "WITH due AS (
                     SELECT k.id
                       FROM keypool.key k JOIN keypool.scope s ON s.id = k.scope_id
                      WHERE k.removed_at IS NULL AND k.pool_id = ANY ($1)
                        AND (k.disabled_by = 'provider' OR s.disabled_by = 'provider')
                        AND k.disabled_by IS DISTINCT FROM 'operator'
                        AND s.disabled_by IS DISTINCT FROM 'operator'
                        -- First `after` the disabling, twice as long for each earlier round (an
                        -- account that keeps failing again after a check), up to a day.
                        AND coalesce(k.recheck_at,
                                     greatest(k.disabled_at, s.disabled_at)
                                       + least(interval '1 day',
                                               $2 * interval '1 millisecond' * power(2, least(k.rechecks, 20))))
                            <= now()
                      ORDER BY k.id
                      LIMIT $3
                        FOR UPDATE OF k SKIP LOCKED
                 )
                 UPDATE keypool.key k SET recheck_at = now() + interval '{CLAIM}'
                   FROM due WHERE k.id = due.id
                 RETURNING k.id, k.rechecks"
            ),
            None,
            &[pools.into(), after_ms.into(), (max_n as i64).into()],
        ));
        t.filter_map(|r| {
            Some((
                r.get::<i64>(1).ok().flatten()?,
                r.get::<i32>(2).ok().flatten().unwrap_or(0),
            ))
        })
        .collect()
    });
    // The claims are committed with the caller's transaction; the secrets come from this
    // backend's configuration cache, opened there.
    let cfg = config::reload_now();
    let rows: Vec<_> = claimed
        .into_iter()
        .filter_map(|(id, rechecks)| {
            let key = cfg.key_by_id(id)?;
            Some((
                id,
                key.provider.clone(),
                key.model.clone(),
                key.base_url.clone(),
                Some(key.secret.to_string()).filter(|s| !s.is_empty()),
                rechecks,
            ))
        })
        .collect();
    TableIterator::new(rows)
}

/// `keypool_recheck_result(key_id, accepted, detail, next_check)`: what the provider said of a
/// key `keypool_recheck_due` handed out: accepted, the key (and its account) is enabled again;
/// otherwise it is checked again after `next_check`. Each check is an event (`key_rechecked`).
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_recheck_result(
    key_id: Option<i64>,
    accepted: Option<bool>,
    detail: default!(Option<&str>, "NULL"),
    next_check: default!(Option<Interval>, "NULL"),
) {
    let _path = privilege::pin_search_path();
    let Some(key_id) = key_id else {
        errors::null_argument("key_id").raise()
    };
    let Some(accepted) = accepted else {
        errors::null_argument("accepted").raise()
    };
    let next_ms = next_check.map(interval_ms).unwrap_or(600_000).clamp(1_000, 86_400_000);
    let detail: String = detail.unwrap_or("").chars().take(MAX_DETAIL).collect();
    let grants = access::grants();
    access::key_pool(&grants, key_id, Privilege::Use);
    // Only a key a provider's answer disabled, and that keypool_recheck_due handed out (its claim
    // is live): an operator's decision is not the worker's to undo.
    let still_disabled = admin::as_owner(grants.owner, |client| {
        admin::one::<bool>(
            client,
            &format!(
                "SELECT true FROM keypool.key k JOIN keypool.scope s ON s.id = k.scope_id
              WHERE k.id = $1 AND k.removed_at IS NULL
                AND k.recheck_at > now() AND k.recheck_at <= now() + interval '{CLAIM}'
                AND (k.disabled_by = 'provider' OR s.disabled_by = 'provider')
                AND k.disabled_by IS DISTINCT FROM 'operator' AND s.disabled_by IS DISTINCT FROM 'operator'"
            ),
            &[key_id.into()],
        )
        .unwrap_or(false)
    });
    if !still_disabled {
        return;
    }
    if accepted {
        // Enabled, with the round counted: an account that fails again at once (a model list
        // answers while billing is still out) waits twice as long before its next check.
        admin::enable_key_after_check(grants.owner, key_id);
        admin::record_key_event(
            grants.owner,
            "key_rechecked",
            key_id,
            &format!("accepted by the provider ({detail}): enabled again"),
        );
        return;
    }
    admin::as_owner(grants.owner, |client| {
        errors::spi(client.update(
            "UPDATE keypool.key SET rechecks = rechecks + 1, recheck_at = now() + $2 * interval '1 millisecond'
              WHERE id = $1",
            None,
            &[key_id.into(), next_ms.into()],
        ));
    });
    admin::record_key_event(
        grants.owner,
        "key_rechecked",
        key_id,
        &format!("still rejected ({detail}); next check in {} s", next_ms / 1000),
    );
}
