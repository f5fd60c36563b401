//! pg_keypool: governed pools of LLM and API provider keys inside PostgreSQL.
//!
//! The extension decides which key a request may use right now without breaking any provider
//! limit (`keypool_reserve`), and records what the call did (`keypool_settle`). Rate-window state
//! lives in shared memory (the library must be in `shared_preload_libraries`); configuration and
//! history live in tables of the `keypool` schema.
//!
//! Modules, by concept:
//! - `window`, `calendar`: rolling-minute and calendar-day windows (pure)
//! - `outcome`, `breaker`: what a provider's answer means; a key's circuit breaker
//! - `shmem`, `registry`, `reservation`: the shared-memory region, slot binding, open reservations
//! - `config`: each backend's cache of the configuration tables
//! - `reserve`, `settle`, `admin`, `views`: the SQL functions
//! - `history`, `persist`, `launcher`: hourly usage history, the state file, background work
//! - `fallbacks`: fallback chains across pools; `budgets`: spend budgets
//! - `failover`: the replicated record of scopes' use, and the catch-up after a promotion

use pgrx::prelude::*;

mod access;
mod admin;
mod args;
mod assign;
mod breaker;
mod budgets;
pub mod calendar;
mod clock;
mod composite;
mod config;
mod errors;
mod failover;
mod fallbacks;
mod history;
pub mod keyring;
mod launcher;
mod member_cache;
mod members;
mod operations;
pub mod outcome;
mod persist;
mod privilege;
mod provider;
mod queue;
mod quota;
mod refusal;
mod registry;
mod reservation;
mod reserve;
mod reset;
pub mod seal;
mod settings;
mod settle;
pub mod shares;
mod shmem;
mod tokens;
pub mod tree;
mod txn;
mod vault;
mod views;
pub mod window;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../../sql/api.sql", name = "api", finalize);
extension_sql_file!("../../sql/queue.sql", name = "queue", requires = ["schema"]);
extension_sql_file!("../../sql/operations.sql", name = "operations", requires = ["queue"]);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    settings::define(preloading);
    if !preloading {
        return;
    }
    shmem::install_hooks();
    launcher::register();
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // A small ring, so that a test can fill it.
        vec![
            "shared_preload_libraries = 'pg_keypool'",
            "pg_keypool.max_reservations = 1024",
        ]
    }
}
