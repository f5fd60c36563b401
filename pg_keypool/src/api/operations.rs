//! Operations in SQL that act on many pools at once: the models pools serve, a key's
//! credentials (for `validate`), prices, the usage report, re-enabling keys, alerts. Each
//! checks the caller's rights, then works as the extension's owner on what the caller may see
//! (the internal SQL is in `sql/operations.sql`).

use pgrx::datum::Date;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::AnyNumeric;

use crate::api::admin;
use crate::catalog::grants::Privilege;
use crate::catalog::privilege;
use crate::catalog::vault;
use crate::engine::access::{self};
use crate::engine::composite::{self, Value};
use crate::errors::{self, Code};

/// `keypool_models()`: every pool the caller may use or read and the models its shared keys
/// serve (no secrets; users' own keys never make a model name route to a pool). A pool without
/// keys, or with keys that name no model, has a row with model NULL.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_models() -> TableIterator<'static, (name!(pool, String), name!(model, Option<String>))> {
    let _path = privilege::pin_search_path();
    let grants = access::grants();
    let caller = privilege::caller();
    let mut pools: Vec<i64> = access::pools_with(&grants, caller, Privilege::Use)
        .into_iter()
        .chain(access::pools_with(&grants, caller, Privilege::Read))
        .map(|(id, _)| id)
        .collect();
    pools.sort_unstable();
    pools.dedup();
    let rows = privilege::spi_as_owner(grants.owner, |client| {
        let t = errors::spi(client.select(
            "SELECT DISTINCT p.name, k.model
               FROM keypool.pool p
               LEFT JOIN keypool.key k ON k.pool_id = p.id AND k.removed_at IS NULL AND k.owner IS NULL
              WHERE p.id = ANY ($1)
              ORDER BY 1, 2",
            None,
            &[pools.into()],
        ));
        t.filter_map(|r| Some((r.get::<String>(1).ok().flatten()?, r.get::<String>(2).ok().flatten())))
            .collect::<Vec<_>>()
    });
    TableIterator::new(rows)
}

crate::pg_finfo_v1!(pg_finfo_keypool_key_credentials_c);

/// `keypool_key_credentials(key_id, OUT provider, OUT model, OUT base_url, OUT secret)`: what it
/// takes to call a key's provider, secret included (the worker's `validate`). Needs `admin` on
/// the key's pool.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn keypool_key_credentials_c(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let _path = privilege::pin_search_path();
        let Some(key_id) = pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 0) else {
            errors::null_argument("key_id").raise()
        };
        let grants = access::grants();
        access::key_pool(&grants, key_id, Privilege::Admin);
        let row = privilege::spi_as_owner(grants.owner, |client| {
            let master_keys = vault::recorded(client, false);
            let t = errors::spi(client.select(
                "SELECT provider, model, base_url, secret_sealed FROM keypool.key WHERE id = $1 AND removed_at IS NULL",
                None,
                &[key_id.into()],
            ));
            t.into_iter().next().map(|r| {
                let sealed = r.get::<Vec<u8>>(4).ok().flatten().unwrap_or_default();
                (
                    r.get::<String>(1).ok().flatten().unwrap_or_default(),
                    r.get::<String>(2).ok().flatten(),
                    r.get::<String>(3).ok().flatten().unwrap_or_default(),
                    vault::open(&master_keys, key_id, &sealed),
                )
            })
        });
        match row {
            Some((provider, model, base_url, secret)) => composite::form(
                fcinfo,
                &[
                    Value::Text(&provider),
                    Value::opt_text(model.as_deref()),
                    Value::Text(&base_url),
                    Value::opt_text(Some(secret.as_str()).filter(|s| !s.is_empty())),
                ],
            ),
            None => errors::undefined(format!("key {key_id} does not exist")).raise(),
        }
    }
}

/// `keypool_set_price(provider, model, input_per_million, output_per_million, per_request)`:
/// the price of a provider's model (NULL model: every model) for cost estimates. Prices apply
/// to every pool: needs `admin` on every pool.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_set_price(
    provider: Option<&str>,
    model: Option<&str>,
    input_per_million: Option<AnyNumeric>,
    output_per_million: Option<AnyNumeric>,
    per_request: default!(Option<AnyNumeric>, 0),
) {
    let _path = privilege::pin_search_path();
    let (Some(provider), Some(input), Some(output), Some(per_request)) =
        (provider, input_per_million, output_per_million, per_request)
    else {
        errors::error(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "provider, input_per_million, output_per_million and per_request must not be NULL",
        )
        .hint("Use model => NULL (or '') for the price of every model of the provider.")
        .raise()
    };
    if provider.is_empty() || provider.len() > 200 || model.is_some_and(|m| m.len() > 200) {
        errors::invalid("provider and model must be 1 to 200 bytes long").raise();
    }
    let zero = AnyNumeric::from(0);
    let not_a_number = |n: &AnyNumeric| n.to_string() == "NaN";
    if input < zero || output < zero || per_request < zero {
        errors::invalid("prices must not be negative").raise();
    }
    if not_a_number(&input) || not_a_number(&output) || not_a_number(&per_request) {
        errors::invalid("prices must be numbers, not NaN").raise();
    }
    let grants = access::grants();
    access::require_every_pool(&grants, "set prices", Privilege::Admin);
    privilege::spi_as_owner(grants.owner, |client| {
        errors::spi(client.update(
            "INSERT INTO keypool.price AS p (provider, model, input_per_million, output_per_million, per_request, updated_at)
             VALUES ($1, coalesce($2, ''), $3, $4, $5, now())
             ON CONFLICT ON CONSTRAINT price_pkey DO UPDATE
                SET input_per_million = excluded.input_per_million, output_per_million = excluded.output_per_million,
                    per_request = excluded.per_request, updated_at = now()",
            None,
            &[provider.into(), model.into(), input.into(), output.into(), per_request.into()],
        ));
    });
}

/// `keypool_usage_report(from_day, to_day)`: per key per day of the pools the caller may read:
/// requests, tokens, errors, estimated cost.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn keypool_usage_report(
    from_day: Option<Date>,
    to_day: Option<Date>,
) -> TableIterator<
    'static,
    (
        name!(day, Date),
        name!(pool, String),
        name!(key_id, i64),
        name!(label, String),
        name!(provider, String),
        name!(model, Option<String>),
        name!(requests, i64),
        name!(prompt_tokens, i64),
        name!(completion_tokens, i64),
        name!(errors, i64),
        name!(estimated_cost, Option<AnyNumeric>),
        name!(budget, Option<AnyNumeric>),
        name!(budget_period, Option<String>),
        name!(period_cost, Option<AnyNumeric>),
    ),
> {
    let _path = privilege::pin_search_path();
    let grants = access::grants();
    let pools: Vec<i64> = access::pools_with(&grants, privilege::caller(), Privilege::Read)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let rows = privilege::spi_as_owner(grants.owner, |client| {
        let t = errors::spi(client.select(
            "SELECT * FROM keypool.usage_report($1, $2, $3)",
            None,
            &[pools.into(), from_day.into(), to_day.into()],
        ));
        t.filter_map(|r| {
            Some((
                r.get::<Date>(1).ok().flatten()?,
                r.get::<String>(2).ok().flatten()?,
                r.get::<i64>(3).ok().flatten()?,
                r.get::<String>(4).ok().flatten()?,
                r.get::<String>(5).ok().flatten()?,
                r.get::<String>(6).ok().flatten(),
                r.get::<i64>(7).ok().flatten().unwrap_or(0),
                r.get::<i64>(8).ok().flatten().unwrap_or(0),
                r.get::<i64>(9).ok().flatten().unwrap_or(0),
                r.get::<i64>(10).ok().flatten().unwrap_or(0),
                r.get::<AnyNumeric>(11).ok().flatten(),
                r.get::<AnyNumeric>(12).ok().flatten(),
                r.get::<String>(13).ok().flatten(),
                r.get::<AnyNumeric>(14).ok().flatten(),
            ))
        })
        .collect::<Vec<_>>()
    });
    TableIterator::new(rows)
}

/// `keypool_enable_keys(pool)`: re-enables the keys (and accounts) that provider answers
/// disabled (401, API_KEY_INVALID, billing) in one pool, or in every pool the caller
/// administers (NULL); keys an operator disabled stay disabled. Returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_enable_keys(pool: default!(Option<&str>, "NULL")) -> i64 {
    let _path = privilege::pin_search_path();
    let grants = access::grants();
    let pools: Vec<i64> = match pool {
        Some(name) => vec![access::pool_id(&grants, name, Privilege::Admin)],
        None => access::pools_with(&grants, privilege::caller(), Privilege::Admin)
            .into_iter()
            .map(|(id, _)| id)
            .collect(),
    };
    let keys: Vec<i64> = privilege::spi_as_owner(grants.owner, |client| {
        let t = errors::spi(client.select(
            "SELECT k.id
               FROM keypool.key k JOIN keypool.scope s ON s.id = k.scope_id
              WHERE k.removed_at IS NULL AND k.pool_id = ANY ($1)
                AND (k.disabled_by = 'provider' OR (s.disabled_by = 'provider' AND k.disabled_reason IS NULL))
              ORDER BY k.id",
            None,
            &[pools.into()],
        ));
        t.filter_map(|r| r.get::<i64>(1).ok().flatten()).collect()
    });
    for &k in &keys {
        admin::enable_key(grants.owner, k);
    }
    keys.len() as i64
}

/// `keypool_check_alerts()`: records alerts raised and cleared since the last check as events
/// (announced on keypool_events); returns how many were raised. Alerts concern every pool:
/// needs `admin` on every pool (the background checks them anyway).
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_check_alerts() -> i64 {
    let _path = privilege::pin_search_path();
    let grants = access::grants();
    access::require_every_pool(&grants, "check alerts", Privilege::Admin);
    privilege::spi_as_owner(grants.owner, |client| {
        errors::spi(client.update("SELECT keypool.check_alerts()", None, &[]))
            .first()
            .get_one::<i64>()
            .ok()
            .flatten()
            .unwrap_or(0)
    })
}
