//! keypool-worker: the hands of pg_keypool. It reserves capacity through the extension's SQL
//! API, calls the granted key's provider, and settles what happened; the extension decides
//! everything else (limits, fairness, cooldowns, which errors disable a key).
//!
//! Modules, by concept:
//! - `config`, `duration`: the command line and its environment mirrors
//! - `db`: the SQL API (reserve, settle, release) over a connection pool; `pgtls`: TLS to
//!   PostgreSQL as libpq's sslmode and sslrootcert say
//! - `openai`, `sse`: OpenAI's chat wire format and server-sent events
//! - `providers`: one module per provider wire format
//! - `gateway`: one request's reserve → call → settle → retry
//! - `auth`: who is calling (service, API and admin tokens), decided before a body is read
//! - `server`: the OpenAI-compatible HTTP endpoint; `admin`, `dashboard`, `metrics`: the admin
//!   and user APIs, the operators' page, Prometheus; `queue`: the SQL request queue's consumer;
//!   `serve`: both, with heartbeats and graceful shutdown; `listener`: the connection loop and
//!   its timeouts
//! - `import_env`, `validate`: key management commands; `mock`: the mock provider
//! - key labels come from the `keypool-mask` crate, shared with the extension

pub mod commands;
pub mod config;
pub mod db;
pub mod duration;
pub mod gateway;
pub mod http;
pub mod protocol;
pub mod providers;
