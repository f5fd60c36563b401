//! Errors raised to the caller: always a SQLSTATE and a message, with a detail and hint where
//! they help. Raising unwinds (pgrx turns it into a PostgreSQL ERROR), so nothing done so far in
//! the statement survives, and Rust guards (locks) are released on the way out.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

pub use pgrx::PgSqlErrorCode as Code;

/// An error on its way to the caller.
#[must_use]
pub struct Raise {
    report: ErrorReport,
}

#[track_caller]
pub fn error(code: PgSqlErrorCode, message: impl Into<String>) -> Raise {
    Raise {
        report: ErrorReport::new(code, message.into(), "pg_keypool"),
    }
}

impl Raise {
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.report = self.report.set_detail(detail);
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.report = self.report.set_hint(hint);
        self
    }

    pub fn raise(self) -> ! {
        self.report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Invalid argument value (SQLSTATE 22023).
#[track_caller]
pub fn invalid(message: impl Into<String>) -> Raise {
    error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)
}

/// A required argument was NULL (SQLSTATE 22004).
#[track_caller]
pub fn null_argument(name: &str) -> Raise {
    error(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("{name} must not be NULL"),
    )
}

/// The named pool, key or reservation does not exist (SQLSTATE 42704).
#[track_caller]
pub fn undefined(message: impl Into<String>) -> Raise {
    error(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, message)
}

/// Shared memory is missing because the library was not preloaded (SQLSTATE 55000).
#[track_caller]
pub fn not_preloaded() -> Raise {
    error(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "pg_keypool is not loaded in shared_preload_libraries",
    )
    .detail("Rate windows and reservations live in shared memory, which is set up only when the server starts with the library preloaded.")
    .hint("Add pg_keypool to shared_preload_libraries in postgresql.conf and restart the server.")
}

/// Unwraps an SPI result; an SPI failure is an internal error.
#[track_caller]
pub fn spi<T>(r: Result<T, pgrx::spi::SpiError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => error(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("pg_keypool internal query failed: {e}"),
        )
        .raise(),
    }
}
