//! Pure rules and arithmetic: no PostgreSQL in here, unit-tested with plain `#[test]`s.

pub mod calendar;
pub mod minute;
pub mod money;
pub mod outcome;
pub mod provider;
pub mod rebalance;
pub mod refusal;
pub mod seal;
pub mod shares;
pub mod tree;
pub mod window;
