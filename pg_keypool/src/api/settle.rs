//! `keypool_settle` and `keypool_release`: closing a reservation.
//!
//! Settling records what the provider call did: tokens are corrected from the estimate to the
//! actual count (a refund frees capacity, an overrun is charged), the request itself stays
//! counted, and the outcome acts on the key and scope (outcome.rs). Releasing gives back the
//! whole reservation because the call was never sent.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::api::admin;
use crate::catalog::config::{self};
use crate::catalog::grants::Privilege;
use crate::catalog::model::Config;
use crate::catalog::privilege;
use crate::engine::args::{check_tokens, MAX_TOKENS};
use crate::engine::budgets;
use crate::engine::minute;
use crate::engine::quota::{self, Ticket};
use crate::errors::{self, Code};
use crate::policy::calendar;
use crate::policy::outcome::{bare, caller_shaped, classify, needs_key_check, Outcome, NEEDS_KEY_CHECK};
use crate::policy::window::Charge;
use crate::settings;
use crate::state::breaker;
use crate::state::callers::TOKEN_SLOT;
use crate::state::clock;
use crate::state::provider_hold::Report;
use crate::state::reservation::{
    self, Closed, NotOpen, Record, FLAG_BORROWED, FLAG_CALLER_OPEN, FLAG_CONCURRENT, FLAG_TOKEN_OPEN, FLAG_TRIAL,
};
use crate::state::shmem::{self, Shared};
use crate::state::slots::{CoolingReason, Counter};

const MAX_ERROR_CODE: usize = 200;
const MAX_RETRY_AFTER_MS: i64 = 7 * 86_400_000;

fn not_open(id: i64, why: NotOpen) -> ! {
    let lease_s = settings::lease_ms() / 1000;
    match why {
        NotOpen::Unknown => errors::undefined(format!("reservation {id} does not exist"))
            .hint("Reservation ids come from keypool_reserve in this database; ids from before a server restart are no longer open.")
            .raise(),
        NotOpen::Closed(Closed::Settled) => {
            errors::error(Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("reservation {id} is already settled")).raise()
        }
        NotOpen::Closed(Closed::Released) => {
            errors::error(Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("reservation {id} is already released")).raise()
        }
        NotOpen::Expired => errors::error(Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("reservation {id} has expired"))
            .detail(format!("It stayed open longer than pg_keypool.lease ({lease_s} s); its estimate stays charged."))
            .hint("Settle or release reservations promptly, or raise pg_keypool.lease.")
            .raise(),
        NotOpen::Closed(Closed::Evicted) | NotOpen::Gone => errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("reservation {id} is no longer open"),
        )
        .detail("It expired, or so many reservations were opened after it that its slot was reused; its estimate stays charged.")
        .hint("Raise pg_keypool.max_reservations above requests per second times the longest provider call.")
        .raise(),
        NotOpen::Forbidden => errors::error(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for reservation {id}"),
        )
        .detail("Another role made this reservation.")
        .hint("Settle or release a reservation as the role that made it, or as an administrator of its pool.")
        .raise(),
        NotOpen::Closed(Closed::Expired) => unreachable!("reported as NotOpen::Expired"),
    }
}

/// Whether the calling role may close reservation `r`: it made it (or has the privileges of the
/// role that did), or it administers the reservation's pool.
fn may_close(cfg: &Config, caller: pgrx::pg_sys::Oid, r: &Record) -> bool {
    if unsafe { pgrx::pg_sys::has_privs_of_role(caller, pgrx::pg_sys::Oid::from(r.role)) } {
        return true;
    }
    let pool = cfg.key_by_id(r.key_id).map(|k| k.pool_id);
    cfg.grants.allows(caller, pool, Privilege::Admin)
}

/// Checks that reservation `id` is open and the caller's to close, without closing it.
fn peek(sh: &Shared, cfg: &Config, id: Option<i64>) {
    let Some(id) = id else {
        errors::null_argument("reservation_id").raise()
    };
    if id <= 0 {
        not_open(id, NotOpen::Unknown);
    }
    let caller = privilege::caller();
    if let Err(why) = reservation::peek(
        sh,
        id as u64,
        cfg.owner.dboid,
        clock::now_ms(),
        settings::lease_ms(),
        |r| may_close(cfg, caller, r),
    ) {
        not_open(id, why);
    }
}

fn take(sh: &Shared, cfg: &Config, id: Option<i64>, how: Closed) -> (i64, Record) {
    let Some(id) = id else {
        errors::null_argument("reservation_id").raise()
    };
    if id <= 0 {
        not_open(id, NotOpen::Unknown);
    }
    let caller = privilege::caller();
    match reservation::close(
        sh,
        id as u64,
        cfg.owner.dboid,
        clock::now_ms(),
        settings::lease_ms(),
        how,
        |r| may_close(cfg, caller, r),
    ) {
        Ok(record) => {
            stop_counting(sh, cfg, &record);
            (id, record)
        }
        Err(why) => not_open(id, why),
    }
}

/// A reservation that counted against its key's `max_concurrent` no longer does.
fn stop_counting(sh: &Shared, cfg: &Config, r: &Record) {
    if r.flags & FLAG_CONCURRENT == 0 {
        return;
    }
    let _scope = sh.scope(r.scope_slot).lock();
    let key = sh.key(r.key_slot);
    if key.tag.is(cfg.owner, r.key_id) {
        key.open.remove(r.at_ms, settings::lease_ms());
    }
}

/// Applies a token (and request) correction to the scope windows the reservation charged.
fn correct(sh: &Shared, cfg: &Config, r: &Record, requests: i64, tokens: i64, now: i64) {
    if requests == 0 && tokens == 0 {
        return;
    }
    let mut w = sh.scope(r.scope_slot).lock();
    if w.tag().is(cfg.owner, r.scope_id) {
        let charge = Charge {
            at_ms: r.at_ms,
            day_start_ms: r.day_start_ms,
        };
        w.adjust(now, charge, requests, tokens);
    }
}

fn outcome_counter(o: Outcome) -> Counter {
    match o {
        Outcome::Success => Counter::Success,
        Outcome::RateLimited => Counter::RateLimited,
        Outcome::DailyQuota => Counter::DailyQuota,
        Outcome::KeyInvalid => Counter::KeyInvalid,
        Outcome::Billing => Counter::Billing,
        Outcome::ServerError => Counter::ServerError,
        Outcome::CallerError => Counter::CallerError,
        Outcome::Other => Counter::Other,
    }
}

/// A provider's report of one measure (`remaining_*` and `*_reset_ms` of `keypool_settle`):
/// both or neither.
fn provider_report(what: &str, remaining: Option<i64>, reset_ms: Option<i64>) -> Option<(i64, i64)> {
    match (remaining, reset_ms) {
        (None, None) => None,
        (Some(left), Some(ms)) if left >= 0 && (0..=MAX_RETRY_AFTER_MS).contains(&ms) => Some((left, ms)),
        _ => errors::invalid(format!(
            "remaining_{what} and {what}_reset_ms go together: a count >= 0 and milliseconds between 0 and {MAX_RETRY_AFTER_MS}"
        ))
        .raise(),
    }
}

/// Holds the reservation's scope to what its provider reported when that is less room than
/// its windows count (provider_hold.rs); a hold that begins is an event (`limit_mismatch`).
fn held_to_provider(sh: &Shared, cfg: &Config, r: &Record, reported: (Report, Report), now: i64) {
    let slot = sh.scope(r.scope_slot);
    let began = {
        let w = slot.lock();
        if !w.tag().is(cfg.owner, r.scope_id) {
            return;
        }
        let (requests, tokens, _, _) = w.usage(now);
        let room = |limit: u64, used: u64| match limit {
            0 => i64::MAX,
            l => l.saturating_sub(used).min(i64::MAX as u64) as i64,
        };
        let ours = (room(w.limits.rpm, requests), room(w.limits.tpm, tokens));
        // Without a configured limit the provider's figure is simply obeyed; a mismatch is a
        // configured limit the provider contradicts.
        let configured = (reported.0.is_some() && w.limits.rpm > 0) || (reported.1.is_some() && w.limits.tpm > 0);
        (slot.provider.report(now, reported, ours) && configured && slot.provider.note(now)).then_some(ours)
    };
    if let Some(ours) = began {
        let said = |what: &str, report: Report, ours: i64| {
            report.map(|(left, ms)| {
                let counted = if ours == i64::MAX {
                    "no limit".to_string()
                } else {
                    ours.to_string()
                };
                format!(
                    "{left} {what} left for {} s (pg_keypool counts {counted})",
                    (ms + 999) / 1000
                )
            })
        };
        let what = [said("requests", reported.0, ours.0), said("tokens", reported.1, ours.1)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
        admin::record_outcome_event(
            cfg,
            "limit_mismatch",
            r.key_id,
            Some(r.scope_id),
            &format!(
                "the provider reports {what}: held to its figure until it resets; someone else may use the key, or its limits are set too high"
            ),
        );
    }
}

/// `keypool_settle`: records the outcome of the provider call made under a reservation and
/// returns the outcome class.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_settle(
    reservation_id: Option<i64>,
    status: Option<i32>,
    prompt_tokens: default!(Option<i64>, 0),
    completion_tokens: default!(Option<i64>, 0),
    retry_after_ms: default!(Option<i64>, "NULL"),
    error_code: default!(Option<&str>, "NULL"),
    remaining_requests: default!(Option<i64>, "NULL"),
    requests_reset_ms: default!(Option<i64>, "NULL"),
    remaining_tokens: default!(Option<i64>, "NULL"),
    tokens_reset_ms: default!(Option<i64>, "NULL"),
) -> String {
    let sh = shmem::shared();
    let reported = (
        provider_report("requests", remaining_requests, requests_reset_ms),
        provider_report("tokens", remaining_tokens, tokens_reset_ms),
    );
    let Some(status) = status else {
        errors::null_argument("status").raise()
    };
    if !(status == 0 || (100..=999).contains(&status)) {
        errors::invalid(format!(
            "status must be an HTTP status between 100 and 999, or 0 for no answer; not {status}"
        ))
        .raise();
    }
    let prompt = check_tokens("prompt_tokens", prompt_tokens);
    let completion = check_tokens("completion_tokens", completion_tokens);
    if let Some(ms) = retry_after_ms {
        if !(0..=MAX_RETRY_AFTER_MS).contains(&ms) {
            errors::invalid(format!(
                "retry_after_ms must be between 0 and {MAX_RETRY_AFTER_MS}, not {ms}"
            ))
            .raise();
        }
    }
    if error_code.is_some_and(|c| c.len() > MAX_ERROR_CODE) {
        errors::invalid(format!("error_code is longer than {MAX_ERROR_CODE} bytes")).raise();
    }
    let cfg = config::current();
    if needs_key_check(status, error_code) {
        // Nothing is settled: the worker asks the provider about the key and settles again.
        peek(sh, &cfg, reservation_id);
        return NEEDS_KEY_CHECK.to_string();
    }
    let outcome = classify(status, error_code);
    // A caller's choice (the path, the model) cools an account for the default cooldown at most.
    let longest_cooldown = if error_code.is_some_and(caller_shaped) {
        settings::max_cooldown_ms().min(settings::DEFAULT_COOLDOWN_MS.get() as i64)
    } else {
        settings::max_cooldown_ms()
    };
    // What is recorded is the provider's code, without the worker's prefixes.
    let error_code = error_code.map(bare);
    let (_, r) = take(sh, &cfg, reservation_id, Closed::Settled);
    let now = clock::now_ms();

    let actual = (prompt + completion).min(MAX_TOKENS);
    correct(sh, &cfg, &r, 0, actual - r.est_tokens, now);
    let change = (0, actual - r.est_tokens);
    minute::settle(sh, r.pool_slot, &r.caller, r.flags & FLAG_CALLER_OPEN != 0, change, now);
    minute::settle(sh, TOKEN_SLOT, &r.token, r.flags & FLAG_TOKEN_OPEN != 0, change, now);
    if reported.0.is_some() || reported.1.is_some() {
        held_to_provider(sh, &cfg, &r, reported, now);
    }
    if r.hold.held() {
        // The true cost replaces the estimate (the estimate stays when the price is gone).
        let cost = cfg
            .key_by_id(r.key_id)
            .and_then(|k| k.price)
            .map_or(r.hold.amount, |p| {
                crate::policy::money::cost(&p, prompt as u64, completion as u64)
            });
        budgets::adjust(sh, r.pool_slot, &r.hold, cost as i64 - r.hold.amount as i64);
    }

    let key_slot = sh.key(r.key_slot);
    let mut breaker_opened = None;
    if key_slot.tag.is(cfg.owner, r.key_id) {
        breaker_opened = breaker::record(key_slot, outcome, r.flags & FLAG_TRIAL != 0, now);
        key_slot.add(Counter::PromptTokens, prompt);
        key_slot.add(Counter::CompletionTokens, completion);
        key_slot.add(outcome_counter(outcome), 1);
    }

    let scope_slot = sh.scope(r.scope_slot);
    let scope_is_ours = scope_slot.tag.is(cfg.owner, r.scope_id);
    match outcome {
        Outcome::RateLimited if scope_is_ours => {
            // What a caller asks for is capped: a report cannot take an account out for long.
            let ms = retry_after_ms
                .unwrap_or(settings::DEFAULT_COOLDOWN_MS.get() as i64)
                .clamp(1, longest_cooldown.max(1));
            scope_slot.cool_until(now + ms, CoolingReason::RateLimited);
            let until = scope_slot.cooling_until_ms.load(Ordering::Acquire);
            admin::record_outcome_event(
                &cfg,
                "rate_limited",
                r.key_id,
                Some(r.scope_id),
                &format!(
                    "{}; account cooling until {}",
                    reason(&cfg, r.key_id, status, error_code),
                    clock::format_ms(until)
                ),
            );
        }
        Outcome::DailyQuota if scope_is_ours => {
            if let Some(scope) = cfg.scope_by_id(r.scope_id) {
                let (_, day_end) = calendar::day_bounds(scope.tz, now);
                scope_slot.cool_until(day_end, CoolingReason::DailyQuota);
                admin::record_outcome_event(
                    &cfg,
                    "daily_quota",
                    r.key_id,
                    Some(r.scope_id),
                    &format!(
                        "{}; account cooling until its daily reset at {}",
                        reason(&cfg, r.key_id, status, error_code),
                        clock::format_ms(day_end)
                    ),
                );
            }
        }
        Outcome::KeyInvalid => {
            admin::disable_key_after_error(&cfg, r.key_id, &reason(&cfg, r.key_id, status, error_code))
        }
        Outcome::Billing => {
            admin::disable_scope_after_error(&cfg, r.scope_id, &reason(&cfg, r.key_id, status, error_code))
        }
        _ => {}
    }
    if let Some(failures) = breaker_opened {
        admin::record_outcome_event(
            &cfg,
            "breaker_open",
            r.key_id,
            None,
            &format!(
                "{} server errors in a row (last: {}); out until {}",
                failures,
                reason(&cfg, r.key_id, status, error_code),
                clock::format_ms(now + settings::BREAKER_COOLDOWN_MS.get() as i64)
            ),
        );
    }
    outcome.as_str().to_string()
}

/// `keypool_classify`: what `keypool_settle` would make of a provider answer, without settling
/// anything (the worker's `validate` uses it, so that the rules live only here).
#[pg_extern(immutable, parallel_safe)]
fn keypool_classify(status: Option<i32>, error_code: default!(Option<&str>, "NULL")) -> String {
    let Some(status) = status else {
        errors::null_argument("status").raise()
    };
    classify(status, error_code).as_str().to_string()
}

/// A human-readable reason such as `HTTP 401 invalid_api_key`, never containing the secret.
fn reason(cfg: &Config, key_id: i64, status: i32, error_code: Option<&str>) -> String {
    let mut text = if status == 0 {
        "no answer".to_string()
    } else {
        format!("HTTP {status}")
    };
    if let Some(code) = error_code.filter(|c| !c.is_empty()) {
        text.push(' ');
        text.push_str(code);
    }
    match cfg.key_by_id(key_id) {
        Some(k) if !k.secret.is_empty() => text.replace(k.secret.as_str(), &k.label),
        _ => text,
    }
}

/// `keypool_release`: the call was never sent; gives back the request and its estimate.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_release(reservation_id: Option<i64>) {
    let sh = shmem::shared();
    let cfg = config::current();
    let (_, r) = take(sh, &cfg, reservation_id, Closed::Released);
    let now = clock::now_ms();
    correct(sh, &cfg, &r, -1, -r.est_tokens, now);
    let change = (-1, -r.est_tokens);
    minute::settle(sh, r.pool_slot, &r.caller, r.flags & FLAG_CALLER_OPEN != 0, change, now);
    minute::settle(sh, TOKEN_SLOT, &r.token, r.flags & FLAG_TOKEN_OPEN != 0, change, now);
    if r.hold.held() {
        budgets::adjust(sh, r.pool_slot, &r.hold, -(r.hold.amount as i64));
    }
    if r.member_index != u32::MAX {
        let ticket = Ticket {
            index: r.member_index,
            hash: r.member_hash,
            day: r.member_day,
            borrowed: r.flags & FLAG_BORROWED != 0,
        };
        quota::give_back(sh, r.pool_slot, &ticket);
    }
    let key_slot = sh.key(r.key_slot);
    if key_slot.tag.is(cfg.owner, r.key_id) {
        if r.flags & FLAG_TRIAL != 0 {
            breaker::abandon_trial(key_slot);
        }
        key_slot.add(Counter::Requests, -1);
        key_slot.add(Counter::Released, 1);
    }
}
