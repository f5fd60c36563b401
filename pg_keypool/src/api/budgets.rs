//! `keypool_set_budget`: a pool's spend budget and each user's. How budgets are held and
//! charged is in engine/budgets.rs.

use crate::catalog::config;
use crate::catalog::grants::Privilege;
use crate::catalog::privilege;
use crate::engine::access;
use crate::engine::budgets::price_of;
use crate::errors;
use crate::policy::money::{parse_amount, to_decimal};
use crate::state::clock;

/// `keypool_set_budget`: the pool's spend budget per `period` ('day' or 'month', in the pool's
/// time zone), and each user's (`per_user`), in the currency of `keypool_prices`. NULL amount and
/// per_user remove the budget. Needs admin on the pool; every usable key needs a price.
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn keypool_set_budget(
    pool: Option<&str>,
    amount: Option<pgrx::AnyNumeric>,
    period: Option<&str>,
    per_user: pgrx::default!(Option<pgrx::AnyNumeric>, "NULL"),
) {
    let _path = privilege::pin_search_path();
    let Some(pool_name) = pool else {
        errors::null_argument("pool").raise()
    };
    let amount_of = |name: &str, v: Option<pgrx::AnyNumeric>| {
        v.map(|n| match parse_amount(&n.to_string()) {
            Ok(m) => m,
            Err(why) => errors::invalid(format!("{name} {why}"))
                .hint("Amounts are in the currency of keypool_prices, to the millionth.")
                .raise(),
        })
    };
    let limit = amount_of("amount", amount);
    let per_user = amount_of("per_user", per_user);
    let removing = limit.is_none() && per_user.is_none();
    let period = match period {
        _ if removing => None,
        Some(p @ ("day" | "month")) => Some(p),
        Some(p) => errors::invalid(format!("period must be 'day' or 'month', not '{p}'")).raise(),
        None => errors::null_argument("period").raise(),
    };
    let cfg = config::current();
    let pool = access::pool(&cfg, pool_name, Privilege::Admin);
    if !removing {
        for &k in &pool.keys {
            if cfg.usable(&cfg.keys[k]) {
                price_of(&cfg.keys[k], pool);
            }
        }
    }
    let pool_id = pool.id;
    let as_sql = |m: Option<u64>| m.map(|v| v as i64);
    privilege::spi_as_owner(cfg.extension_owner, |client| {
        errors::spi(client.update(
            "UPDATE keypool.pool SET budget_micros = $2, budget_per_user_micros = $3, budget_period = $4 WHERE id = $1",
            None,
            &[
                pool_id.into(),
                as_sql(limit).into(),
                as_sql(per_user).into(),
                period.into(),
            ],
        ));
        let what = match period {
            None => "no budget".to_string(),
            Some(p) => {
                let mut parts = Vec::new();
                if let Some(l) = limit {
                    parts.push(format!("{} a {p}", to_decimal(l)));
                }
                if let Some(u) = per_user {
                    parts.push(format!("{} per user a {p}", to_decimal(u)));
                }
                parts.join(", ")
            }
        };
        errors::spi(client.update(
            "INSERT INTO keypool.event (at, kind, pool_id, reason) VALUES ($1, 'budget_set', $2, $3)",
            None,
            &[
                clock::to_timestamptz(clock::now_ms()).into(),
                pool_id.into(),
                what.as_str().into(),
            ],
        ));
    });
}
