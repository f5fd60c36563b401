//! Fallback chains: the pools `keypool_reserve` tries next, in the same call, when a pool
//! refuses (`keypool_set_fallbacks`).
//!
//! A chain is flat: the fallbacks' own chains are not followed, so a chain can never loop. Each
//! link applies its own limits and shares. `POOL_EXHAUSTED` and `NO_KEYS` fall through;
//! `QUOTA_EXCEEDED` (the user's share) only when the pool says so, since a share is a promise per
//! pool. Links the caller may not use, or that the caller's API token does not list, are
//! skipped.

use pgrx::prelude::*;

use crate::catalog::grants::Privilege;
use crate::catalog::model::{Config, Pool};
use crate::catalog::privilege;
use crate::engine::access::{self};
use crate::errors;
use crate::policy::refusal::Refusal;
use crate::state::clock;

/// Longest chain accepted.
pub const MAX_LINKS: usize = 16;

/// Whether a refusal of the pool goes on down its chain.
pub fn falls_through(pool: &Pool, refusal: &Refusal) -> bool {
    match refusal {
        Refusal::PoolExhausted | Refusal::NoKeys | Refusal::TooLarge => true,
        // Past their share of the day or of the minute here: on only if the pool says so.
        Refusal::QuotaExceeded | Refusal::UserRateLimited => pool.fallback_on_quota,
        // A budget is the pool's owner's decision about money: it never sends users elsewhere.
        Refusal::BudgetExceeded => false,
    }
}

/// The links of `pool`'s chain the caller may reserve in: names, in order.
pub fn links(cfg: &Config, pool: &Pool, within: Option<&[String]>) -> Vec<String> {
    if pool.fallbacks.is_empty() {
        return Vec::new();
    }
    let caller = privilege::caller();
    pool.fallbacks
        .iter()
        .map(|&i| &cfg.pools[i])
        .filter(|link| cfg.grants.allows(caller, Some(link.id), Privilege::Use))
        .filter(|link| within.is_none_or(|w| w.contains(&link.name)))
        .map(|link| link.name.clone())
        .collect()
}

/// The refusal a whole chain answers: `POOL_EXHAUSTED` if any link was exhausted, else
/// `USER_RATE_LIMITED`, `BUDGET_EXCEEDED` or `QUOTA_EXCEEDED` if the user's minute, a budget or
/// the user's share refused somewhere, else `NO_KEYS`; with the smallest wait of the chain.
#[derive(Default)]
pub struct ChainRefusal {
    exhausted: bool,
    user_limited: bool,
    budget: bool,
    quota: bool,
    retry_after_ms: Option<i64>,
}

impl ChainRefusal {
    pub fn note(&mut self, refusal: &Refusal, retry_after_ms: Option<i64>) {
        match refusal {
            Refusal::PoolExhausted => self.exhausted = true,
            Refusal::UserRateLimited => self.user_limited = true,
            Refusal::QuotaExceeded => self.quota = true,
            Refusal::BudgetExceeded => self.budget = true,
            // A link no key of which could ever take the estimate: as if it had none.
            Refusal::NoKeys | Refusal::TooLarge => {}
        }
        if let Some(ms) = retry_after_ms {
            self.retry_after_ms = Some(self.retry_after_ms.map_or(ms, |r| r.min(ms)));
        }
    }

    pub fn answer(&self) -> (Refusal, Option<i64>) {
        let refusal = if self.exhausted {
            Refusal::PoolExhausted
        } else if self.user_limited {
            Refusal::UserRateLimited
        } else if self.budget {
            Refusal::BudgetExceeded
        } else if self.quota {
            Refusal::QuotaExceeded
        } else {
            Refusal::NoKeys
        };
        (refusal, self.retry_after_ms)
    }
}

/// `keypool_set_fallbacks`: sets the pools tried next, in order, when `pool` refuses (an empty
/// array: none). Needs admin on the pool and use on every fallback.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_set_fallbacks(
    pool: Option<&str>,
    fallbacks: Option<Vec<Option<String>>>,
    on_quota_exceeded: default!(Option<bool>, false),
) {
    let _path = privilege::pin_search_path();
    let Some(pool) = pool else {
        errors::null_argument("pool").raise()
    };
    let Some(fallbacks) = fallbacks else {
        errors::null_argument("fallbacks").raise()
    };
    let on_quota_exceeded = on_quota_exceeded.unwrap_or(false);
    if fallbacks.len() > MAX_LINKS {
        errors::invalid(format!(
            "a fallback chain has at most {MAX_LINKS} pools, not {}",
            fallbacks.len()
        ))
        .raise();
    }
    let mut names: Vec<String> = Vec::with_capacity(fallbacks.len());
    for name in fallbacks {
        let Some(name) = name else {
            errors::invalid("fallbacks must not contain NULL").raise()
        };
        if name.is_empty() || name.len() > 200 {
            errors::invalid("a pool name in fallbacks is empty or longer than 200 bytes").raise();
        }
        if name == pool {
            errors::invalid(format!("pool \"{pool}\" cannot be its own fallback")).raise();
        }
        if names.contains(&name) {
            errors::invalid(format!("pool \"{name}\" appears twice in the fallback chain")).raise();
        }
        names.push(name);
    }
    let grants = access::grants();
    let pool_id = access::pool_id(&grants, pool, Privilege::Admin);
    let ids: Vec<i64> = names
        .iter()
        .map(|n| access::pool_id(&grants, n, Privilege::Use))
        .collect();
    privilege::spi_as_owner(grants.owner, |client| {
        errors::spi(client.update(
            "UPDATE keypool.pool SET fallback_on_quota = $2 WHERE id = $1",
            None,
            &[pool_id.into(), on_quota_exceeded.into()],
        ));
        errors::spi(client.update(
            "DELETE FROM keypool.pool_fallback WHERE pool_id = $1",
            None,
            &[pool_id.into()],
        ));
        errors::spi(client.update(
            "INSERT INTO keypool.pool_fallback (pool_id, position, fallback_id)
             SELECT $1, t.position, t.id FROM unnest($2::bigint[]) WITH ORDINALITY AS t(id, position)",
            None,
            &[pool_id.into(), ids.into()],
        ));
        let chain = if names.is_empty() {
            "no fallbacks".to_string()
        } else {
            format!(
                "{pool} → {}{}",
                names.join(" → "),
                if on_quota_exceeded {
                    " (also when a user's share is used up)"
                } else {
                    ""
                }
            )
        };
        errors::spi(client.update(
            "INSERT INTO keypool.event (at, kind, pool_id, reason) VALUES ($1, 'fallbacks_set', $2, $3)",
            None,
            &[
                clock::to_timestamptz(clock::now_ms()).into(),
                pool_id.into(),
                chain.as_str().into(),
            ],
        ));
    });
}
