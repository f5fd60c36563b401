//! Configuration functions: pools, keys, their scopes, and enabling or disabling them.
//!
//! They write the internal tables as the extension's owner (callers get EXECUTE on these
//! functions, not access to the tables), validate every argument before writing anything, and
//! record what they changed in `keypool.event`. The trigger on the tables makes every backend
//! reload its cache when the transaction ends.

use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::AnyNumeric;

use crate::catalog::config::{self};
use crate::catalog::grants::Privilege;
use crate::catalog::model::Config;
use crate::catalog::privilege;
use crate::catalog::vault;
use crate::engine::access::{self};
use crate::errors::{self, Code};
use crate::policy::calendar;
use crate::policy::provider;
use crate::policy::seal;
use crate::policy::shares::MAX_WINDOW_DAYS;
use crate::settings;
use crate::state::breaker;
use crate::state::clock;
use crate::state::shmem;

const MAX_NAME: usize = 200;
const MAX_SECRET: usize = 8192;
const MAX_URL: usize = 2048;
const MAX_REASON: usize = 1000;

fn now_ts() -> TimestampWithTimeZone {
    clock::to_timestamptz(clock::now_ms())
}

fn required<'a>(name: &str, v: Option<&'a str>, max: usize) -> &'a str {
    let Some(v) = v else {
        errors::null_argument(name).raise()
    };
    if v.trim().is_empty() {
        errors::invalid(format!("{name} must not be empty")).raise();
    }
    if v.len() > max {
        errors::invalid(format!("{name} is longer than {max} bytes")).raise();
    }
    v
}

fn optional<'a>(name: &str, v: Option<&'a str>, max: usize) -> Option<&'a str> {
    v.map(|s| required(name, Some(s), max))
}

pub(crate) fn positive<T: Into<i64> + Copy>(name: &str, v: Option<T>) -> Option<i64> {
    let v = v.map(Into::into);
    if let Some(n) = v {
        if n <= 0 {
            errors::invalid(format!(
                "{name} must be a positive number, or NULL for no limit; not {n}"
            ))
            .raise();
        }
    }
    v
}

/// Runs `f` inside SPI as the extension's owner.
pub(crate) fn as_owner<R>(owner: pgrx::pg_sys::Oid, f: impl FnOnce(&mut pgrx::spi::SpiClient<'_>) -> R) -> R {
    privilege::spi_as_owner(owner, f)
}

/// Runs a statement that returns at most one row and returns its first column.
///
/// No row limit is passed on purpose: with one, the executor stops an `UPDATE ... RETURNING`
/// before its statement-level AFTER triggers fire, and those keep every backend's cache fresh.
pub(crate) fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    client: &mut pgrx::spi::SpiClient<'_>,
    sql: &str,
    args: &[DatumWithOid<'_>],
) -> Option<T> {
    let table = errors::spi(client.update(sql, None, args));
    if table.is_empty() {
        return None;
    }
    errors::spi(table.first().get_one::<T>())
}

fn record_event(
    client: &mut pgrx::spi::SpiClient<'_>,
    kind: &str,
    pool_id: Option<i64>,
    key_id: Option<i64>,
    scope_id: Option<i64>,
    reason: Option<&str>,
) {
    errors::spi(client.update(
        "INSERT INTO keypool.event (at, kind, pool_id, key_id, scope_id, reason) VALUES ($1, $2, $3, $4, $5, $6)",
        None,
        &[
            now_ts().into(),
            kind.into(),
            pool_id.into(),
            key_id.into(),
            scope_id.into(),
            reason.into(),
        ],
    ));
}

/// An activity window in whole days (1 to 90); a window of 0 means none.
fn window_days(window: Option<Interval>) -> Option<Option<i32>> {
    let w = window?.into_inner();
    if w.month != 0 {
        errors::invalid("active_window must be given in days or hours, not months")
            .hint("For example interval '7 days'.")
            .raise();
    }
    let micros = w.day as i64 * 86_400_000_000 + w.time;
    if micros == 0 {
        return Some(None);
    }
    let days = micros.div_euclid(86_400_000_000) + i64::from(micros.rem_euclid(86_400_000_000) != 0);
    if !(1..=MAX_WINDOW_DAYS as i64).contains(&days) || micros < 0 {
        errors::invalid(format!("active_window must be between 1 and {MAX_WINDOW_DAYS} days")).raise();
    }
    Some(Some(days as i32))
}

fn check_min_share(min_share: Option<i32>) -> Option<i32> {
    if let Some(m) = min_share {
        if m < 0 {
            errors::invalid(format!("min_share must be 0 or more, not {m}")).raise();
        }
    }
    min_share
}

fn check_zone(timezone: Option<&str>) -> Option<&str> {
    if let Some(z) = timezone.filter(|z| !z.is_empty()) {
        if calendar::parse_zone(z).is_none() {
            errors::invalid(format!("unknown time zone \"{z}\""))
                .hint("Use an IANA name such as UTC or America/Los_Angeles.")
                .raise();
        }
    }
    timezone
}

/// A `minute_share` argument: 0 < f <= 1; with `off_at_zero`, 0 switches it off (`Some(None)`).
fn check_minute_share(f: Option<f64>, off_at_zero: bool) -> Option<Option<f64>> {
    match f {
        None => None,
        Some(f) if off_at_zero && f == 0.0 => Some(None),
        Some(f) if f > 0.0 && f <= 1.0 => Some(Some(f)),
        Some(f) => errors::invalid(format!(
            "minute_share must be more than 0 and at most 1{}; not {f}",
            if off_at_zero { ", or 0 to switch it off" } else { "" }
        ))
        .hint("It is the most of the pool's requests and tokens per minute one user may take, e.g. 0.8.")
        .raise(),
    }
}

/// A per-user cap of `keypool_alter_pool`: positive, 0 for none (`Some(None)`), NULL unchanged.
pub(crate) fn check_cap(name: &str, v: Option<i64>) -> Option<Option<i64>> {
    match v {
        None => None,
        Some(0) => Some(None),
        Some(n) if n > 0 => Some(Some(n)),
        Some(n) => errors::invalid(format!("{name} must be a positive number, or 0 for none; not {n}")).raise(),
    }
}

/// `keypool_create_pool`: a named set of keys serving one function (chat, artifact, image...),
/// how its daily capacity is shared among its users, and (`minute_share`) the most of its
/// minute one user may take.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_create_pool(
    name: Option<&str>,
    description: default!(Option<&str>, "NULL"),
    min_share: default!(Option<i32>, 0),
    active_window: default!(Option<Interval>, "NULL"),
    borrowing: default!(Option<bool>, false),
    timezone: default!(Option<&str>, "NULL"),
    minute_share: default!(Option<f64>, "NULL"),
) -> i64 {
    let _path = privilege::pin_search_path();
    let name = required("name", name, MAX_NAME);
    let description = optional("description", description, MAX_REASON);
    let min_share = check_min_share(min_share).unwrap_or(0);
    let active_days = window_days(active_window).flatten();
    let timezone = check_zone(timezone).filter(|z| !z.is_empty());
    let minute_share = check_minute_share(minute_share, false).flatten();
    let grants = access::grants();
    access::require_every_pool(&grants, "create pools", Privilege::Admin);
    let id = as_owner(grants.owner, |client| {
        let id: Option<i64> = one(
            client,
            "INSERT INTO keypool.pool (name, description, min_share, active_days, borrowing, timezone, minute_share)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING RETURNING id",
            &[
                name.into(),
                description.into(),
                min_share.into(),
                active_days.into(),
                borrowing.unwrap_or(false).into(),
                timezone.into(),
                minute_share.into(),
            ],
        );
        let Some(id) = id else {
            errors::error(
                Code::ERRCODE_DUPLICATE_OBJECT,
                format!("pool \"{name}\" already exists"),
            )
            .hint("Add keys to it with keypool_add_key(), or change it with keypool_alter_pool().")
            .raise()
        };
        record_event(client, "pool_created", Some(id), None, None, None);
        id
    });
    config::refuse_unless_it_fits(&[], &[]);
    id
}

/// `keypool_alter_pool`: changes a pool's options; NULL leaves an option as it is. An
/// active_window of 0 removes the window; a timezone of '' returns to the keys' time zone;
/// default_cost is what a reservation without a token estimate holds of a budget;
/// owner_fallback says whether users whose own keys are all at their limits fall back to the
/// shared keys; minute_share, user_rpm, user_tpm and user_max_concurrent limit each user's
/// minute (0 switches one off).
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_alter_pool(
    name: Option<&str>,
    min_share: default!(Option<i32>, "NULL"),
    active_window: default!(Option<Interval>, "NULL"),
    borrowing: default!(Option<bool>, "NULL"),
    timezone: default!(Option<&str>, "NULL"),
    description: default!(Option<&str>, "NULL"),
    default_cost: default!(Option<AnyNumeric>, "NULL"),
    owner_fallback: default!(Option<bool>, "NULL"),
    minute_share: default!(Option<f64>, "NULL"),
    user_rpm: default!(Option<i32>, "NULL"),
    user_tpm: default!(Option<i64>, "NULL"),
    user_max_concurrent: default!(Option<i32>, "NULL"),
) {
    let _path = privilege::pin_search_path();
    let name = required("name", name, MAX_NAME);
    let default_cost = default_cost.map(|n| match crate::policy::money::parse_amount(&n.to_string()) {
        Ok(m) => m as i64,
        Err(why) => errors::invalid(format!("default_cost {why}")).raise(),
    });
    let min_share = check_min_share(min_share);
    let window = window_days(active_window);
    let timezone = check_zone(timezone);
    let description = optional("description", description, MAX_REASON);
    let minute_share = check_minute_share(minute_share, true);
    let user_rpm = check_cap("user_rpm", user_rpm.map(i64::from));
    let user_tpm = check_cap("user_tpm", user_tpm);
    let user_max_concurrent = check_cap("user_max_concurrent", user_max_concurrent.map(i64::from));
    let grants = access::grants();
    access::pool_id(&grants, name, Privilege::Admin);
    as_owner(grants.owner, |client| {
        let id: Option<i64> = one(
            client,
            "UPDATE keypool.pool SET
                 min_share = coalesce($2, min_share),
                 active_days = CASE WHEN $3 THEN $4 ELSE active_days END,
                 borrowing = coalesce($5, borrowing),
                 timezone = CASE WHEN $6::text IS NULL THEN timezone ELSE nullif($6, '') END,
                 description = coalesce($7, description),
                 default_cost_micros = coalesce($8, default_cost_micros),
                 owner_fallback = coalesce($9, owner_fallback),
                 minute_share = CASE WHEN $10 THEN $11 ELSE minute_share END,
                 user_rpm = CASE WHEN $12 THEN $13::integer ELSE user_rpm END,
                 user_tpm = CASE WHEN $14 THEN $15 ELSE user_tpm END,
                 user_max_concurrent = CASE WHEN $16 THEN $17::integer ELSE user_max_concurrent END
              WHERE name = $1 RETURNING id",
            &[
                name.into(),
                min_share.into(),
                window.is_some().into(),
                window.flatten().into(),
                borrowing.into(),
                timezone.into(),
                description.into(),
                default_cost.into(),
                owner_fallback.into(),
                minute_share.is_some().into(),
                minute_share.flatten().into(),
                user_rpm.is_some().into(),
                user_rpm.flatten().into(),
                user_tpm.is_some().into(),
                user_tpm.flatten().into(),
                user_max_concurrent.is_some().into(),
                user_max_concurrent.flatten().into(),
            ],
        );
        let Some(id) = id else {
            errors::undefined(format!("pool \"{name}\" does not exist")).raise()
        };
        record_event(client, "pool_altered", Some(id), None, None, None);
    });
}

/// `keypool_add_key`: adds a key to a pool and returns its id. See the README for the rules on
/// accounts (shared scopes) and limits.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_add_key(
    pool: Option<&str>,
    provider: Option<&str>,
    secret: Option<&str>,
    model: default!(Option<&str>, "NULL"),
    account: default!(Option<&str>, "NULL"),
    rpm: default!(Option<i32>, "NULL"),
    rpd: default!(Option<i32>, "NULL"),
    tpm: default!(Option<i64>, "NULL"),
    tpd: default!(Option<i64>, "NULL"),
    base_url: default!(Option<&str>, "NULL"),
    timezone: default!(Option<&str>, "NULL"),
    group_no: default!(Option<i32>, "NULL"),
    priority: default!(Option<i32>, "NULL"),
    owner: default!(Option<&str>, "NULL"),
    max_concurrent: default!(Option<i32>, "NULL"),
) -> i64 {
    let _path = privilege::pin_search_path();
    let pool = required("pool", pool, MAX_NAME);
    let provider_name = required("provider", provider, MAX_NAME);
    let Some(provider) = provider::find(provider_name) else {
        errors::invalid(format!("unknown provider \"{provider_name}\""))
            .hint(format!("Known providers: {}.", provider::names()))
            .raise()
    };
    let secret = match secret {
        None if provider.keyless => "",
        None => errors::null_argument("secret")
            .hint(format!(
                "Only providers that serve without a key take secret => NULL: {}.",
                provider::keyless_names()
            ))
            .raise(),
        // Sealed for transport it is longer; the plaintext is checked once opened.
        s => required("secret", s, 2 * MAX_SECRET),
    };
    let model = optional("model", model, MAX_NAME);
    let account = optional("account", account, MAX_NAME);
    let (rpm, rpd, tpm, tpd) = (
        positive("rpm", rpm),
        positive("rpd", rpd),
        positive("tpm", tpm),
        positive("tpd", tpd),
    );
    let limits_given = rpm.is_some() || rpd.is_some() || tpm.is_some() || tpd.is_some();
    let base_url_given = base_url.is_some();
    let explicit_url = optional("base_url", base_url, MAX_URL);
    let zone = optional("timezone", timezone, MAX_NAME);
    if let Some(z) = zone {
        if calendar::parse_zone(z).is_none() {
            errors::invalid(format!("unknown time zone \"{z}\""))
                .hint("Use an IANA name such as UTC or America/Los_Angeles.")
                .raise();
        }
    }
    if let Some(g) = group_no {
        if !(1..=1_000_000).contains(&g) {
            errors::invalid(format!("group_no must be between 1 and 1000000, not {g}")).raise();
        }
    }
    let priority = check_priority(priority);
    let max_concurrent = positive("max_concurrent", max_concurrent);
    let owner = owner.map(|o| crate::engine::args::check_user_id(Some(o)));
    if owner.is_some() && account.is_some() {
        errors::invalid("a user's own key has an account of its own: leave account NULL")
            .detail("An owned key's limits are never merged with the shared keys' accounts.")
            .raise();
    }
    if owner.is_some() && group_no.is_some() {
        errors::invalid("a user's own key takes no users: leave group_no NULL").raise();
    }
    let grants = access::grants();
    // A user's own key needs `use` (the owner, or a service acting for them); a shared key,
    // `admin`.
    let pool_id = access::pool_id(
        &grants,
        pool,
        if owner.is_some() {
            Privilege::Use
        } else {
            Privilege::Admin
        },
    );
    // A secret sealed for transport (the worker seals every secret it passes, so that no
    // statement log holds it) opens for this pool and owner only.
    let opened = as_owner(grants.owner, |client| {
        vault::unsealed(client, secret, &keypool_transport::context_add(pool, owner))
    });
    let secret: &str = opened.as_str();
    if secret.len() > MAX_SECRET {
        errors::invalid(format!("secret is longer than {MAX_SECRET} bytes")).raise();
    }
    if secret.trim().is_empty() && !(secret.is_empty() && provider.keyless) {
        errors::invalid("secret must not be empty").raise();
    }
    // Where a key is called is the pool administrators' choice: a user's own key goes where the
    // pool's shared keys of its provider go (with none, it is refused) unless an administrator
    // adds it; no user picks the address the worker calls. Nor may a user add
    // a key whose provider cannot say whether the key is real (a keyless server, a plain HTTP
    // API): such a "key" would only reach the shared backend beside the shared keys' limits.
    let by_admin =
        grants.allows(privilege::caller(), Some(pool_id), Privilege::Admin) && !settings::ACTING_FOR_USER.get();
    if owner.is_some() && !by_admin {
        if base_url_given {
            errors::error(
                Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("only an administrator of pool \"{pool}\" may set base_url for a user's own key"),
            )
            .hint("Leave base_url NULL: the key is called where the pool's keys of its provider are.")
            .raise();
        }
        if provider.keyless || !provider.checks_keys {
            errors::error(
                Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "users may not add own keys of provider \"{}\": it cannot tell a real key from a made-up one",
                    provider.name
                ),
            )
            .hint(format!(
                "Own keys are for providers that check keys: {}.",
                provider::checked_names()
            ))
            .raise();
        }
    }
    let inherited_url: Option<String> = match (owner, explicit_url) {
        (Some(_), None) => as_owner(grants.owner, |client| {
            one(
                client,
                "SELECT base_url FROM keypool.key
                  WHERE pool_id = $1 AND provider = $2 AND owner IS NULL AND removed_at IS NULL
                  ORDER BY id LIMIT 1",
                &[pool_id.into(), provider.name.into()],
            )
        }),
        _ => None,
    };
    // Without a shared key of its provider, a user's own key goes nowhere: not to a cloud
    // provider's public address nor to a default on the worker's own host, neither of which an
    // administrator chose for this pool.
    let default_url = match owner {
        Some(_) if !by_admin || provider.keyless || !provider.checks_keys => None,
        _ => provider.default_base_url,
    };
    let base_url = match explicit_url.or(inherited_url.as_deref()).or(default_url) {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => url.trim_end_matches('/').to_string(),
        Some(url) => errors::invalid(format!("base_url must start with http:// or https://, not \"{url}\"")).raise(),
        None if owner.is_some() => errors::error(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "pool \"{pool}\" has no shared key of provider \"{}\": a user's own key is called only where an administrator configured that provider",
                provider.name
            ),
        )
        .raise(),
        None => errors::invalid(format!("provider \"{}\" needs a base_url", provider.name))
            .hint("Pass base_url => 'https://host/v1'.")
            .raise(),
    };
    let label = if secret.is_empty() {
        keyless_label(&base_url, model)
    } else {
        keypool_mask::mask(secret)
    };
    let identity = vault::identity(secret, provider.name, &base_url, model);

    let (key_id, new_scope, new_key) = as_owner(grants.owner, |client| {
        // Locking the pool row serializes additions to the pool (group numbers).
        let locked: Option<i64> = one(
            client,
            "SELECT id FROM keypool.pool WHERE id = $1 FOR UPDATE",
            &[pool_id.into()],
        );
        if locked.is_none() {
            errors::undefined(format!("pool \"{pool}\" does not exist")).raise();
        }
        // The master key to seal with; rotations wait until this transaction ends.
        let master = vault::sealing_key(client);
        let digest = seal::digest(&master, &identity);
        let limit_args = |scope_id: i64| -> [DatumWithOid<'static>; 5] {
            [scope_id.into(), rpm.into(), rpd.into(), tpm.into(), tpd.into()]
        };
        let set_limits = "UPDATE keypool.scope SET rpm = $2, rpd = $3, tpm = $4, tpd = $5 WHERE id = $1";

        // The same secret in the same pool: the key exists already.
        let existing: Option<i64> = one(
            client,
            "SELECT id FROM keypool.key WHERE pool_id = $1 AND secret_hmac = $2",
            &[pool_id.into(), digest.clone().into()],
        );
        if let Some(key_id) = existing {
            let owned: Option<String> = one(client, "SELECT owner FROM keypool.key WHERE id = $1", &[key_id.into()]);
            if owner.is_some() && owned.as_deref() != owner {
                // Which key holds it is not the caller's to learn, nor may an owner take over
                // a key (shared or another user's) by adding its secret.
                errors::error(Code::ERRCODE_UNIQUE_VIOLATION, "this secret is already in the pool").raise();
            }
            if owner.is_none() && owned.is_some() {
                errors::error(
                    Code::ERRCODE_UNIQUE_VIOLATION,
                    "this secret is already in the pool as a user's own key",
                )
                .raise();
            }
            // A removed key comes back, with its group number and history.
            let restored: Option<i64> = one(
                client,
                "UPDATE keypool.key SET removed_at = NULL WHERE id = $1 AND removed_at IS NOT NULL RETURNING id",
                &[key_id.into()],
            );
            if restored.is_some() {
                record_event(client, "key_restored", Some(pool_id), Some(key_id), None, None);
            }
            if let Some(p) = priority {
                errors::spi(client.update(
                    "UPDATE keypool.key SET priority = $2 WHERE id = $1 AND priority <> $2",
                    None,
                    &[key_id.into(), p.into()],
                ));
            }
            if let Some(n) = max_concurrent {
                errors::spi(client.update(
                    "UPDATE keypool.key SET max_concurrent = $2 WHERE id = $1 AND max_concurrent IS DISTINCT FROM $2",
                    None,
                    &[key_id.into(), (n as i32).into()],
                ));
            }
            if limits_given {
                let scope_id: Option<i64> = one(
                    client,
                    "SELECT scope_id FROM keypool.key WHERE id = $1",
                    &[key_id.into()],
                );
                if let Some(scope_id) = scope_id {
                    errors::spi(client.update(set_limits, None, &limit_args(scope_id)));
                }
            }
            return (key_id, None, false);
        }

        if let Some(o) = owner {
            // The pool row is locked: the count cannot change under us.
            let cap = settings::MAX_OWNED_KEYS_PER_USER.get().max(0) as i64;
            let held: i64 = one(
                client,
                "SELECT count(*) FROM keypool.key WHERE pool_id = $1 AND owner = $2 AND removed_at IS NULL",
                &[pool_id.into(), o.into()],
            )
            .unwrap_or(0);
            if held >= cap {
                errors::error(
                    Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                    format!("user \"{o}\" has {held} own keys in pool \"{pool}\", the most allowed"),
                )
                .detail(format!("pg_keypool.max_owned_keys_per_user = {cap}"))
                .hint("Remove one of the user's keys first.")
                .raise();
            }
        }
        let zone = zone.unwrap_or(provider.day_zone);
        let find_account = "SELECT id FROM keypool.scope
                             WHERE provider = $1 AND account = $2 AND model IS NOT DISTINCT FROM $3";
        let account_args = || -> [DatumWithOid<'_>; 3] { [provider.name.into(), account.into(), model.into()] };
        // An owned key always gets a scope of its own (account is NULL for it).
        let existing_scope: Option<i64> = match account {
            Some(_) => one(client, find_account, &account_args()),
            None => None,
        };
        let mut new_scope: Option<i64> = None;
        let scope_id: i64 = match existing_scope {
            Some(id) => {
                // The account exists: its limits are replaced by the ones given, if any.
                if limits_given {
                    errors::spi(client.update(set_limits, None, &limit_args(id)));
                }
                if timezone.is_some() {
                    errors::spi(client.update(
                        "UPDATE keypool.scope SET timezone = $2 WHERE id = $1",
                        None,
                        &[id.into(), zone.into()],
                    ));
                }
                id
            }
            None => {
                let inserted: Option<i64> = one(
                    client,
                    "INSERT INTO keypool.scope (provider, account, model, rpm, rpd, tpm, tpd, timezone)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (provider, account, (coalesce(model, ''))) WHERE account IS NOT NULL DO NOTHING
                     RETURNING id",
                    &[
                        provider.name.into(),
                        account.into(),
                        model.into(),
                        rpm.into(),
                        rpd.into(),
                        tpm.into(),
                        tpd.into(),
                        zone.into(),
                    ],
                );
                new_scope = inserted;
                // Created concurrently by another session: use theirs.
                inserted
                    .or_else(|| one(client, find_account, &account_args()))
                    .unwrap_or_else(|| {
                        errors::error(
                            Code::ERRCODE_INTERNAL_ERROR,
                            "pg_keypool: scope vanished while adding a key",
                        )
                        .raise()
                    })
            }
        };
        // A group number asked for must be free: apps store it (seed 004's api_key_group).
        if let Some(g) = group_no {
            let holder: Option<i64> = one(
                client,
                "SELECT id FROM keypool.key WHERE pool_id = $1 AND group_no = $2",
                &[pool_id.into(), g.into()],
            );
            if let Some(holder) = holder {
                errors::error(
                    Code::ERRCODE_UNIQUE_VIOLATION,
                    format!("group {g} of pool \"{pool}\" belongs to key {holder}"),
                )
                .hint("Leave group_no NULL to take the next free number.")
                .raise();
            }
        }
        // The row id is the sealed secret's associated data: take it before sealing.
        let key_id: i64 = one(client, "SELECT nextval('keypool.key_id_seq')", &[])
            .unwrap_or_else(|| errors::error(Code::ERRCODE_INTERNAL_ERROR, "pg_keypool: no key id").raise());
        let sealed = vault::seal_secret(&master, key_id, secret, &identity);
        let inserted: Option<i64> = one(
            client,
            "INSERT INTO keypool.key (id, pool_id, scope_id, provider, model, base_url, secret_sealed, sealed_with,
                                      secret_hmac, label, group_no, priority, owner, max_concurrent)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                     coalesce($11, (SELECT coalesce(max(group_no), 0) + 1 FROM keypool.key WHERE pool_id = $2)),
                     coalesce($12, 0), $13, $14)
             ON CONFLICT (pool_id, secret_hmac) DO NOTHING
             RETURNING id",
            &[
                key_id.into(),
                pool_id.into(),
                scope_id.into(),
                provider.name.into(),
                model.into(),
                base_url.as_str().into(),
                sealed.sealed.into(),
                sealed.master.into(),
                sealed.digest.into(),
                label.as_str().into(),
                group_no.into(),
                priority.into(),
                owner.into(),
                max_concurrent.map(|n| n as i32).into(),
            ],
        );
        let new_key = inserted.is_some();
        let key_id = match inserted {
            Some(id) => id,
            // Added concurrently by another session.
            None => one(
                client,
                "SELECT id FROM keypool.key WHERE pool_id = $1 AND secret_hmac = $2",
                &[pool_id.into(), digest.into()],
            )
            .unwrap_or_else(|| {
                errors::error(
                    Code::ERRCODE_INTERNAL_ERROR,
                    "pg_keypool: key vanished while being added",
                )
                .raise()
            }),
        };
        let detail = owner.map(|o| format!("owned by {o}"));
        record_event(
            client,
            "key_added",
            Some(pool_id),
            Some(key_id),
            Some(scope_id),
            detail.as_deref(),
        );
        (key_id, new_scope, new_key)
    });
    // The one who adds learns that the configuration does not fit shared memory (53400, and
    // nothing is added), never everyone's next reservation.
    let scopes: Vec<i64> = new_scope.into_iter().collect();
    let cfg = config::refuse_unless_it_fits(&[key_id], &scopes);
    if let (Some(cfg), true) = (cfg, new_key) {
        give_back_slots_on_abort(&cfg, key_id, new_scope);
    }
    key_id
}

/// If this transaction rolls back, the slots bound to the key it added (and to the account it
/// made for it) go back at once: nobody else can have used a row that never committed, and an
/// add that keeps failing (a dry run, a rejected check) must not leave slots behind.
fn give_back_slots_on_abort(cfg: &Config, key_id: i64, new_scope: Option<i64>) {
    let Some(key) = cfg.key_by_id(key_id) else {
        return;
    };
    let (key_slot, owner) = (key.slot, cfg.owner);
    let scope = new_scope.and_then(|id| cfg.scope_by_id(id)).map(|s| (s.slot, s.id));
    crate::state::txn::on_abort(move || {
        if let Some(sh) = shmem::try_shared() {
            crate::state::registry::release(sh, owner, Some((key_slot, key_id)), scope);
        }
    });
}

/// `keypool_rotate_secret`: replaces a key's secret in place (seed 002's "rotate keys
/// periodically"): the same id, group number, account, limits, history and users. Reservations
/// granted on the old secret settle normally. A secret that another key of the pool holds is
/// refused without saying which key.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_rotate_secret(key_id: Option<i64>, new_secret: Option<&str>) {
    let _path = privilege::pin_search_path();
    let Some(key_id) = key_id else {
        errors::null_argument("key_id").raise()
    };
    let secret = required("new_secret", new_secret, 2 * MAX_SECRET);
    let grants = access::grants();
    access::key_pool(&grants, key_id, Privilege::Admin);
    as_owner(grants.owner, |client| {
        let opened = vault::unsealed(client, secret, &keypool_transport::context_rotate(key_id));
        let secret: &str = opened.as_str();
        if secret.len() > MAX_SECRET {
            errors::invalid(format!("new_secret is longer than {MAX_SECRET} bytes")).raise();
        }
        if secret.trim().is_empty() {
            errors::invalid("new_secret must not be empty").raise();
        }
        // The row is locked until the end of the transaction: two rotations of one key queue.
        let table = errors::spi(client.update(
            "SELECT pool_id, provider, base_url, model, label FROM keypool.key
              WHERE id = $1 AND removed_at IS NULL FOR UPDATE",
            None,
            &[key_id.into()],
        ));
        if table.is_empty() {
            errors::undefined(format!("key {key_id} does not exist")).raise();
        }
        let row = table.first();
        let pool_id: i64 = errors::spi(row.get::<i64>(1)).unwrap_or(0);
        let provider: String = errors::spi(row.get::<String>(2)).unwrap_or_default();
        let base_url: String = errors::spi(row.get::<String>(3)).unwrap_or_default();
        let model: Option<String> = errors::spi(row.get::<String>(4));
        let old_label: String = errors::spi(row.get::<String>(5)).unwrap_or_default();
        let master = vault::sealing_key(client);
        let identity = vault::identity(secret, &provider, &base_url, model.as_deref());
        let sealed = vault::seal_secret(&master, key_id, secret, &identity);
        let taken: Option<i64> = one(
            client,
            "SELECT id FROM keypool.key WHERE pool_id = $1 AND secret_hmac = $2 AND id <> $3",
            &[pool_id.into(), sealed.digest.clone().into(), key_id.into()],
        );
        if taken.is_some() {
            errors::error(
                Code::ERRCODE_UNIQUE_VIOLATION,
                "another key of the pool already has this secret",
            )
            .hint("Remove that key first, or rotate to a new secret.")
            .raise();
        }
        let label = keypool_mask::mask(secret);
        errors::spi(client.update(
            "UPDATE keypool.key SET secret_sealed = $2, sealed_with = $3, secret_hmac = $4, label = $5 WHERE id = $1",
            None,
            &[
                key_id.into(),
                sealed.sealed.into(),
                sealed.master.into(),
                sealed.digest.into(),
                label.as_str().into(),
            ],
        ));
        record_event(
            client,
            "key_rotated",
            Some(pool_id),
            Some(key_id),
            None,
            Some(&format!("secret {old_label} replaced by {label}")),
        );
    });
}

/// The label of a keyless key: where it is served, and its model (no secret to mask).
fn keyless_label(base_url: &str, model: Option<&str>) -> String {
    let host = base_url
        .split_once("://")
        .map_or(base_url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("");
    match model {
        Some(m) => format!("(no key) {host} {m}"),
        None => format!("(no key) {host}"),
    }
}

/// Priorities a key may have; lower is preferred.
const PRIORITIES: std::ops::RangeInclusive<i32> = -1000..=1000;

fn check_priority(priority: Option<i32>) -> Option<i32> {
    if let Some(p) = priority {
        if !PRIORITIES.contains(&p) {
            errors::invalid(format!(
                "priority must be between {} and {}, not {p}",
                PRIORITIES.start(),
                PRIORITIES.end()
            ))
            .hint("Lower is preferred; the default is 0.")
            .raise();
        }
    }
    priority
}

/// `keypool_alter_key`: changes a key's settings; NULL leaves a setting as it is. A key of a
/// worse (higher) priority serves only while every better key of its pool is at its limits,
/// cooling or disabled; a key with `max_concurrent` never has more reservations open at once
/// (0 removes the limit).
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_alter_key(
    key_id: Option<i64>,
    priority: default!(Option<i32>, "NULL"),
    max_concurrent: default!(Option<i32>, "NULL"),
) {
    let _path = privilege::pin_search_path();
    let Some(key_id) = key_id else {
        errors::null_argument("key_id").raise()
    };
    let priority = check_priority(priority);
    let max_concurrent = check_cap("max_concurrent", max_concurrent.map(i64::from));
    let grants = access::grants();
    access::key_pool(&grants, key_id, Privilege::Admin);
    as_owner(grants.owner, |client| {
        let found: Option<i64> = one(
            client,
            "UPDATE keypool.key SET priority = coalesce($2, priority),
                    max_concurrent = CASE WHEN $3 THEN $4::integer ELSE max_concurrent END
              WHERE id = $1 AND removed_at IS NULL RETURNING pool_id",
            &[
                key_id.into(),
                priority.into(),
                max_concurrent.is_some().into(),
                max_concurrent.flatten().into(),
            ],
        );
        let Some(pool_id) = found else {
            errors::undefined(format!("key {key_id} does not exist")).raise()
        };
        let change = [
            priority.map(|p| format!("priority {p}")),
            max_concurrent.map(|n| match n {
                None => "max_concurrent none".to_string(),
                Some(n) => format!("max_concurrent {n}"),
            }),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        let change = (!change.is_empty()).then_some(change);
        record_event(
            client,
            "key_altered",
            Some(pool_id),
            Some(key_id),
            None,
            change.as_deref(),
        );
    });
}

fn reason_text(reason: Option<&str>, default: &str) -> String {
    match reason.map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) if r.len() > MAX_REASON => errors::invalid(format!("reason is longer than {MAX_REASON} bytes")).raise(),
        Some(r) => r.to_string(),
        None => default.to_string(),
    }
}

/// `keypool_disable_key`: takes a key out of rotation until it is enabled again.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_disable_key(key_id: Option<i64>, reason: default!(Option<&str>, "NULL")) {
    let _path = privilege::pin_search_path();
    let Some(key_id) = key_id else {
        errors::null_argument("key_id").raise()
    };
    let reason = reason_text(reason, "disabled by an operator");
    let grants = access::grants();
    access::key_pool(&grants, key_id, Privilege::Admin);
    as_owner(grants.owner, |client| {
        let found: Option<i64> = one(
            client,
            "UPDATE keypool.key SET disabled_reason = $2, disabled_at = $3, disabled_by = 'operator'
              WHERE id = $1 AND removed_at IS NULL RETURNING pool_id",
            &[key_id.into(), reason.as_str().into(), now_ts().into()],
        );
        let Some(pool_id) = found else {
            errors::undefined(format!("key {key_id} does not exist")).raise()
        };
        record_event(client, "key_disabled", Some(pool_id), Some(key_id), None, Some(&reason));
    });
}

/// `keypool_enable_key`: puts a key back in rotation, with its account if billing disabled it,
/// and closes its circuit breaker.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_enable_key(key_id: Option<i64>) {
    let _path = privilege::pin_search_path();
    let Some(key_id) = key_id else {
        errors::null_argument("key_id").raise()
    };
    let grants = access::grants();
    access::key_pool(&grants, key_id, Privilege::Admin);
    enable_key(grants.owner, key_id);
}

/// Enables a key (and its account) and closes its breaker; the caller's right was checked. An
/// operator's enabling starts the key's rechecks over (recheck.rs).
pub fn enable_key(owner: pgrx::pg_sys::Oid, key_id: i64) {
    enable(owner, key_id, "rechecks = 0");
}

/// Enables a key a recheck found accepted, counting the round (recheck.rs).
pub fn enable_key_after_check(owner: pgrx::pg_sys::Oid, key_id: i64) {
    enable(owner, key_id, "rechecks = rechecks + 1");
}

fn enable(owner: pgrx::pg_sys::Oid, key_id: i64, rechecks: &str) {
    let (pool_id, scope_id) = as_owner(owner, |client| {
        let table = errors::spi(client.update(
            &format!(
                "UPDATE keypool.key SET disabled_reason = NULL, disabled_at = NULL, disabled_by = NULL,
                                        {rechecks}, recheck_at = NULL
                  WHERE id = $1 AND removed_at IS NULL RETURNING pool_id, scope_id"
            ),
            None,
            &[key_id.into()],
        ));
        if table.is_empty() {
            errors::undefined(format!("key {key_id} does not exist")).raise();
        }
        let (pool_id, scope_id) = errors::spi(table.first().get_two::<i64, i64>());
        errors::spi(client.update(
            "UPDATE keypool.scope SET disabled_reason = NULL, disabled_at = NULL, disabled_by = NULL
              WHERE id = $1 AND disabled_reason IS NOT NULL",
            None,
            &[scope_id.into()],
        ));
        record_event(client, "key_enabled", pool_id, Some(key_id), scope_id, None);
        (pool_id, scope_id)
    });
    let _ = (pool_id, scope_id);
    if let Some(sh) = shmem::try_shared() {
        let cfg = config::reload_now();
        if let Some(key) = cfg.key_by_id(key_id) {
            let slot = sh.key(key.slot);
            if slot.tag.is(cfg.owner, key_id) {
                breaker::reset(slot);
            }
        }
    }
}

/// The role calling (before any switch to the extension's owner), for event reasons.
pub fn current_role() -> String {
    access::role_name(privilege::caller())
}

/// Records an operator's action that concerns a pool (or every pool) rather than a key.
pub fn record_admin_event(cfg: &Config, kind: &str, pool_id: Option<i64>, reason: &str) {
    as_owner(cfg.extension_owner, |client| {
        record_event(client, kind, pool_id, None, None, Some(reason))
    });
}

/// Records what a provider answer did to a key or its account: rate-limit hits, daily quotas,
/// circuit breakers opening (settle.rs).
pub fn record_outcome_event(cfg: &Config, kind: &str, key_id: i64, scope_id: Option<i64>, reason: &str) {
    let pool_id = cfg.key_by_id(key_id).map(|k| k.pool_id);
    as_owner(cfg.extension_owner, |client| {
        record_event(client, kind, pool_id, Some(key_id), scope_id, Some(reason))
    });
}

/// Records what happened to a key (its pool is found from the key).
pub fn record_key_event(owner: pgrx::pg_sys::Oid, kind: &str, key_id: i64, reason: &str) {
    as_owner(owner, |client| {
        let pool_id: Option<i64> = one(
            client,
            "SELECT pool_id FROM keypool.key WHERE id = $1",
            &[key_id.into()],
        );
        record_event(client, kind, pool_id, Some(key_id), None, Some(reason))
    });
}

/// Disables a key because its provider rejected it (settle.rs).
pub fn disable_key_after_error(cfg: &Config, key_id: i64, reason: &str) {
    as_owner(cfg.extension_owner, |client| {
        let pool_id: Option<i64> = one(
            client,
            "UPDATE keypool.key SET disabled_reason = $2, disabled_at = $3, disabled_by = 'provider',
                                    recheck_at = NULL
                  WHERE id = $1 AND disabled_reason IS NULL RETURNING pool_id",
            &[key_id.into(), reason.into(), now_ts().into()],
        );
        if pool_id.is_some() {
            record_event(client, "key_disabled", pool_id, Some(key_id), None, Some(reason));
        }
    });
}

/// Disables a whole scope (account) because of a billing answer (settle.rs).
pub fn disable_scope_after_error(cfg: &Config, scope_id: i64, reason: &str) {
    as_owner(cfg.extension_owner, |client| {
        let changed: Option<i64> = one(
            client,
            "UPDATE keypool.scope SET disabled_reason = $2, disabled_at = $3, disabled_by = 'provider'
                  WHERE id = $1 AND disabled_reason IS NULL RETURNING id",
            &[scope_id.into(), reason.into(), now_ts().into()],
        );
        if changed.is_some() {
            // Its keys are checked again from now on (recheck.rs).
            errors::spi(client.update(
                "UPDATE keypool.key SET recheck_at = NULL WHERE scope_id = $1",
                None,
                &[scope_id.into()],
            ));
            record_event(client, "scope_disabled", None, None, Some(scope_id), Some(reason));
        }
    });
}
