//! The extension's clock: wall time, unless a test has set a clock for this database.
//!
//! Tests must be able to cross a minute or a day without waiting for it, and each test runs in
//! its own database, so a settable clock is kept per database in shared memory
//! (`keypool_set_clock`, superuser only). A frozen clock moves only when it is set again.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

use crate::errors::{self, Code};
use crate::state::shmem::{self};
use crate::state::slots::MAX_CLOCKS;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

pub fn to_timestamptz(ms: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(ms.saturating_mul(1000) - PG_EPOCH_US)
        .unwrap_or_else(|_| errors::invalid(format!("time {ms} ms is out of range")).raise())
}

/// A timestamptz datum's value (microseconds since 2000-01-01) for `ms`, saturating.
pub fn timestamptz_datum(ms: i64) -> i64 {
    ms.saturating_mul(1000).saturating_sub(PG_EPOCH_US)
}

pub fn from_timestamptz(ts: TimestampWithTimeZone) -> i64 {
    (i64::from(ts) + PG_EPOCH_US).div_euclid(1000)
}

/// `2026-11-23 14:05:09 UTC`: times in event reasons, independent of the session's settings.
pub fn format_ms(ms: i64) -> String {
    match chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        None => format!("{ms} ms after 1970"),
    }
}

pub fn real_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn my_database() -> u32 {
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// Now, in UTC milliseconds, as this database sees it.
pub fn now_ms() -> i64 {
    if let Some(sh) = shmem::try_shared() {
        if sh.header.clocks_in_use.load(Ordering::Acquire) > 0 {
            let db = my_database();
            for c in &sh.header.clocks {
                if c.dboid.load(Ordering::Acquire) == db {
                    return c.now_ms.load(Ordering::Acquire);
                }
            }
        }
    }
    real_now_ms()
}

/// Freezes this database's clock at `at_ms`, or returns it to wall time with `None`.
pub fn set(at_ms: Option<i64>) {
    let sh = shmem::shared();
    let db = my_database();
    let _registry = sh.header.registry.exclusive();
    let existing = sh.header.clocks.iter().find(|c| c.dboid.load(Ordering::Acquire) == db);
    match (at_ms, existing) {
        (Some(ms), Some(c)) => c.now_ms.store(ms, Ordering::Release),
        (Some(ms), None) => {
            let Some(free) = sh.header.clocks.iter().find(|c| c.dboid.load(Ordering::Acquire) == 0) else {
                errors::error(
                    Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                    format!("more than {MAX_CLOCKS} databases have a test clock set"),
                )
                .hint("Return other databases to wall time with keypool_set_clock(NULL).")
                .raise()
            };
            free.now_ms.store(ms, Ordering::Release);
            free.dboid.store(db, Ordering::Release);
            sh.header.clocks_in_use.fetch_add(1, Ordering::AcqRel);
        }
        (None, Some(c)) => {
            c.dboid.store(0, Ordering::Release);
            sh.header.clocks_in_use.fetch_sub(1, Ordering::AcqRel);
        }
        (None, None) => {}
    }
}
