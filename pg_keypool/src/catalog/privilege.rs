//! Running internal work as the extension's owner, the way PostgreSQL runs a `SECURITY DEFINER`
//! function that has `SET search_path`.
//!
//! Callers are granted EXECUTE on the public functions, never access to the internal tables
//! (which hold the sealed secrets). Internal queries switch to the owner for their duration and
//! always run with `search_path = pg_catalog, keypool, pg_temp`: an unqualified function or
//! operator in them (`left`, `=`, `+` ...) can then only resolve to PostgreSQL's own or the
//! extension's, never to a look-alike the caller planted in a schema of their own (the pattern
//! of CVE-2018-1058). The path is pinned with a GUC nest level, as `fmgr_security_definer` does,
//! once per call: nested internal work of the same call finds it pinned already.

use std::cell::Cell;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{self, Code};

/// The search path of every statement that runs with the owner's rights. `pg_temp` last: the
/// temporary schema is then never searched for functions or operators, and only after the
/// system catalog and the extension's own schema for tables and types.
pub const SAFE_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, keypool, pg_temp";

thread_local! {
    static PINNED: Cell<bool> = const { Cell::new(false) };
}

/// The pinned search path; restores the caller's when dropped.
#[must_use]
pub struct PinnedSearchPath {
    /// The GUC nest level this pin opened; `None` when an outer pin of the same call holds.
    level: Option<i32>,
}

/// Pins `search_path` to [`SAFE_SEARCH_PATH`] until the returned guard is dropped. Cheap when an
/// outer caller of this backend pinned it already.
pub fn pin_search_path() -> PinnedSearchPath {
    if PINNED.get() {
        return PinnedSearchPath { level: None };
    }
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            SAFE_SEARCH_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    PINNED.set(true);
    PinnedSearchPath { level: Some(level) }
}

impl Drop for PinnedSearchPath {
    fn drop(&mut self) {
        let Some(level) = self.level else { return };
        PINNED.set(false);
        // On an ERROR the transaction's (or savepoint's) abort pops the nest level itself, as it
        // does for SECURITY DEFINER functions; popping it here while the error unwinds is not
        // needed.
        if !std::thread::panicking() {
            unsafe { pg_sys::AtEOXact_GUC(true, level) };
        }
    }
}

struct RestoreUser {
    user: pg_sys::Oid,
    context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// The role the caller acts as right now (`current_user`).
pub fn caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetUserId() }
}

/// Runs `f` as `owner` with the pinned search path, and restores the caller's role afterwards
/// (also on error).
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let _path = pin_search_path();
    let mut saved_user = pg_sys::Oid::INVALID;
    let mut saved_context = 0;
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(owner, saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let _restore = RestoreUser {
        user: saved_user,
        context: saved_context,
    };
    f()
}

/// Runs `f` inside SPI as `owner` (see [`as_owner`]).
pub fn spi_as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce(&mut pgrx::spi::SpiClient<'_>) -> R) -> R {
    as_owner(owner, || Spi::connect_mut(f))
}

/// The version of the library; the SQL objects must be of the same version.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The extension's owner, as recorded in pg_extension. Refuses when the extension is not
/// installed here, or its SQL objects are of another version than the library (an upgrade whose
/// `ALTER EXTENSION pg_keypool UPDATE` has not run yet), except within pg_keypool's own
/// update scripts: an update through several releases runs the earlier ones' scripts with this
/// library.
pub fn extension_owner() -> pg_sys::Oid {
    // Read as the caller, but never through a caller's look-alike of `=`.
    let _path = pin_search_path();
    let row = Spi::get_three::<pg_sys::Oid, pg_sys::Oid, String>(
        "SELECT oid, extowner, extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_keypool'",
    );
    // SAFETY: backend-local globals, set by CREATE/ALTER EXTENSION while a script runs.
    let updating = |ext: pg_sys::Oid| unsafe { pg_sys::creating_extension && pg_sys::CurrentExtensionObject == ext };
    match row {
        Ok((Some(_), Some(owner), Some(version))) if version == LIBRARY_VERSION => owner,
        Ok((Some(ext), Some(owner), Some(_))) if updating(ext) => owner,
        Ok((Some(_), Some(_), Some(version))) => errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_keypool's SQL objects in this database are version {version}, its library is {LIBRARY_VERSION}"
            ),
        )
        .detail("The library was upgraded; the database's objects were not.")
        .hint("ALTER EXTENSION pg_keypool UPDATE;")
        .raise(),
        _ => errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "extension pg_keypool is not installed in this database",
        )
        .hint("CREATE EXTENSION pg_keypool;")
        .raise(),
    }
}
