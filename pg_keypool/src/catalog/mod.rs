//! The tables as each backend sees them: the configuration cache, grants, sealed secrets and
//! the keyring, and the failover record of scopes' use.

pub mod config;
pub mod failover;
pub mod grants;
pub mod keyring;
pub mod model;
pub mod privilege;
pub mod query;
pub mod vault;
