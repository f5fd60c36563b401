//! What the SQL functions share: access checks, argument checks, quotas and shares, users'
//! minutes, budgets, membership of pools.

pub mod access;
pub mod args;
pub mod assign;
pub mod budgets;
pub mod composite;
pub mod key_tree;
pub mod member_cache;
pub mod member_load;
pub mod minute;
pub mod quota;
