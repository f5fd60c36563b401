//! The tables as each backend sees them: the configuration cache, API tokens' limits, grants,
//! sealed secrets and the keyring, and the failover record of scopes' use.

pub mod api_tokens;
pub mod config;
pub mod failover;
pub mod grants;
pub mod keyring;
pub mod model;
pub mod privilege;
pub mod query;
pub mod vault;
