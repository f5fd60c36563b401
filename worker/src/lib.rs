//! keypool-worker: the hands of pg_keypool. It reserves capacity through the extension's SQL
//! API, calls the granted key's provider, and settles what happened; the extension decides
//! everything else (limits, fairness, cooldowns, which errors disable a key).
//!
//! Layers, each importing only from the ones listed before it:
//! - `config`, `duration`: the command line and its environment mirrors
//! - `protocol`: the conversation model every dialect parses into and renders from, a codec per
//!   dialect (OpenAI chat and embeddings, Gemini, Anthropic), streams translated event by event,
//!   bounded JSON reading, server-sent events
//! - `providers`: what differs per provider: address, authentication, its dialect, error meaning
//! - `db`: the SQL API (reserve, settle, release, tokens) over a connection pool, with TLS to
//!   PostgreSQL as libpq's sslmode and sslrootcert say (`db::tls`)
//! - `gateway`: one request's reserve → call → settle → retry; the SQL queue's consumer
//!   (`queue`), key validation (`validate`), Prometheus counters (`metrics`)
//! - `http`: the endpoint's state (`endpoint`), who is calling (`credentials`, `auth`), the
//!   OpenAI-compatible routes (`server`), the admin and users' APIs (`admin`, `keys`), the
//!   dashboard, error bodies (`problem`), and the connection loop with its timeouts (`listener`)
//! - `commands`: `serve` (endpoint, queue consumer, heartbeats, graceful shutdown), `import-env`,
//!   `mock-provider`
//! - key labels come from the `keypool-mask` crate, shared with the extension

pub mod commands;
pub mod config;
pub mod db;
pub mod duration;
pub mod gateway;
pub mod http;
pub mod protocol;
pub mod providers;
