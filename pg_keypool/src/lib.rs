//! pg_keypool: governed pools of LLM and API provider keys inside PostgreSQL.
//!
//! The extension decides which key a request may use right now without breaking any provider
//! limit (`keypool_reserve`), and records what the call did (`keypool_settle`). Rate-window state
//! lives in shared memory (the library must be in `shared_preload_libraries`); configuration and
//! history live in tables of the `keypool` schema.
//!
//! Layers, each importing only from the layers listed before it:
//! - `policy`: pure rules and arithmetic, no PostgreSQL (windows, shares, the key tree,
//!   calendars, outcome classes, money, sealing)
//! - `state`: shared memory (slots, member cache, open reservations, the clock) and the state
//!   file that keeps it across restarts
//! - `catalog`: the tables as each backend caches them (configuration, grants, secrets), and the
//!   failover record
//! - `engine`: what the SQL functions share (access checks, quotas, budgets, membership)
//! - `api`: the SQL functions, one module per group
//! - `background`: the launcher, the flusher and the server's start and stop hooks

use pgrx::prelude::*;

mod api;
mod background;
mod catalog;
mod engine;
mod errors;
pub mod policy;
mod settings;
mod state;

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
    background::startup::install_hooks();
    background::launcher::register();
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
