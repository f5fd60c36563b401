//! The SQL surface: one module per group of functions.

pub mod admin;
pub mod budgets;
pub mod fallbacks;
pub mod grants;
pub mod membership;
pub mod operations;
pub mod queue;
pub mod recheck;
pub mod reserve;
pub mod reset;
pub mod secrets;
pub mod settle;
pub mod tokens;
pub mod views;
