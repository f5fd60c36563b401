//! The HTTP endpoint: the OpenAI-compatible routes (server.rs), who is calling (auth), the admin
//! and users' APIs, the dashboard, and the connection loop with its limits (listener.rs).

pub mod admin;
pub mod auth;
pub mod credentials;
pub mod dashboard;
pub mod endpoint;
pub mod keys;
pub mod listener;
pub mod problem;
pub mod server;
