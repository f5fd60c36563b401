//! Keys a provider's answer disabled (an invalid key, an account out of billing) are checked
//! again with the provider's own key check (validate.rs: the model list), first
//! `KEYPOOL_RECHECK_AFTER` after they were disabled and then on a doubling back-off up to a day,
//! and enabled when the provider accepts them. The extension hands out the keys whose check is
//! due (`keypool_recheck_due`, claimed so that no two workers check one key at once) and records
//! each result as an event (`keypool_recheck_result`); an operator's disabling is never undone.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::db::{Db, DbError};
use crate::gateway::validate::{self, Verdict};

/// The longest back-off between two checks of a key.
const MAX_BACKOFF: Duration = Duration::from_secs(86_400);
/// Keys checked per round.
const PER_ROUND: i32 = 10;

/// The wait before the next check of a key that `rechecks` earlier checks found rejected: the
/// first wait doubled once per check, up to a day.
pub fn backoff(after: Duration, rechecks: i32) -> Duration {
    let doublings = rechecks.clamp(0, 30) as u32 + 1;
    after
        .checked_mul(1u32 << doublings.min(20))
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// Checks due keys until `stop` says so, looking every `after / 2` (at least every minute).
pub async fn run(db: Db, http: reqwest::Client, after: Duration, mut stop: watch::Receiver<bool>) {
    let every = (after / 2).clamp(Duration::from_millis(200), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = round(&db, &http, after).await {
            warn!(error = %e, "rechecking disabled keys failed");
        }
    }
}

/// One round: the keys due now, each checked and its result recorded.
async fn round(db: &Db, http: &reqwest::Client, after: Duration) -> Result<(), DbError> {
    for (key, rechecks) in db.recheck_due(after, PER_ROUND).await? {
        let (accepted, detail) = match validate::check(http, db, &key).await? {
            Verdict::Accepted(d) => (true, d),
            Verdict::Rejected { reason, .. } => (false, reason),
            // An answer that does not say the key is good leaves it disabled.
            Verdict::Unknown(d) => (false, d),
            Verdict::NotCheckable(d) => (false, d.to_string()),
        };
        let next = backoff(after, rechecks);
        db.recheck_result(key.id, accepted, &detail, next).await?;
        if accepted {
            info!(
                key = key.id,
                "a disabled key was accepted by its provider: enabled again"
            );
        } else {
            info!(key = key.id, next_s = next.as_secs(), "a disabled key is still refused");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_from_the_first_up_to_a_day() {
        let after = Duration::from_secs(600);
        assert_eq!(backoff(after, 0), Duration::from_secs(1_200));
        assert_eq!(backoff(after, 1), Duration::from_secs(2_400));
        assert_eq!(backoff(after, 6), Duration::from_secs(76_800));
        assert_eq!(backoff(after, 7), MAX_BACKOFF);
        assert_eq!(backoff(after, 1_000), MAX_BACKOFF);
    }
}
