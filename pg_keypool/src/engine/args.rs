//! Checks of the arguments callers pass on the hot path and around it: user ids and token
//! counts, bounded before any work.

use crate::errors;

/// Largest token estimate or count accepted from a caller.
pub const MAX_TOKENS: i64 = 1_000_000_000;
/// Longest user id accepted, in bytes.
pub const MAX_USER_ID: usize = 256;

pub fn check_user_id(user_id: Option<&str>) -> &str {
    let Some(user) = user_id else {
        errors::null_argument("user_id").raise()
    };
    if user.is_empty() {
        errors::invalid("user_id must not be empty").raise();
    }
    if user.len() > MAX_USER_ID {
        errors::invalid(format!(
            "user_id is {} bytes long; the limit is {MAX_USER_ID}",
            user.len()
        ))
        .raise();
    }
    user
}

pub fn check_tokens(name: &str, tokens: Option<i64>) -> i64 {
    let Some(t) = tokens else {
        errors::null_argument(name).raise()
    };
    if !(0..=MAX_TOKENS).contains(&t) {
        errors::invalid(format!("{name} must be between 0 and {MAX_TOKENS}, not {t}")).raise();
    }
    t
}
