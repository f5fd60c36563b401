//! Reservations open right now against a limit of concurrency (a key's `max_concurrent`),
//! counted by when they were granted, so that a reservation nobody settles stops counting when
//! its lease ends without anyone closing it.
//!
//! Grants are counted in [`BUCKETS`] buckets of `width = ceil(lease / (BUCKETS - 1))`
//! milliseconds. A bucket counts while a reservation granted within it may still be inside its
//! lease, so a reservation left open counts at most one bucket width past its lease, never less:
//! the count errs towards refusing a little long, never towards letting one more in. Settling
//! or releasing takes the reservation out of its bucket at once.
//!
//! Every change is made under the lock of the owner's state (a key's: its scope's lock), so a
//! check and the grant that follows it are one step; reads without the lock are for views.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering::Relaxed};

pub const BUCKETS: usize = 16;

#[repr(C)]
#[derive(Default)]
pub struct OpenCount {
    /// The first millisecond of the grants each bucket counts.
    starts: [AtomicI64; BUCKETS],
    counts: [AtomicU32; BUCKETS],
}

/// The bucket width for a lease.
fn width(lease_ms: i64) -> i64 {
    let lease = lease_ms.max(1);
    (lease + BUCKETS as i64 - 2) / (BUCKETS as i64 - 1)
}

/// The bucket of a grant at `at_ms`: its position and first millisecond.
fn bucket(at_ms: i64, lease_ms: i64) -> (usize, i64) {
    let w = width(lease_ms);
    let n = at_ms.div_euclid(w);
    (n.rem_euclid(BUCKETS as i64) as usize, n * w)
}

impl OpenCount {
    /// Whether a bucket starting at `start` may still hold a reservation within its lease.
    fn live(start: i64, now_ms: i64, lease_ms: i64) -> bool {
        start + width(lease_ms) > now_ms - lease_ms
    }

    /// Reservations counted as open at `now_ms`.
    pub fn open(&self, now_ms: i64, lease_ms: i64) -> u32 {
        (0..BUCKETS)
            .filter(|&i| Self::live(self.starts[i].load(Relaxed), now_ms, lease_ms))
            .map(|i| self.counts[i].load(Relaxed))
            .fold(0u32, u32::saturating_add)
    }

    /// Counts a reservation granted at `at_ms` (the caller holds the owner's lock).
    pub fn add(&self, at_ms: i64, lease_ms: i64) {
        let (i, start) = bucket(at_ms, lease_ms);
        if self.starts[i].load(Relaxed) != start {
            // Whatever the bucket counted was granted a whole lease ago or more.
            self.starts[i].store(start, Relaxed);
            self.counts[i].store(0, Relaxed);
        }
        self.counts[i].fetch_add(1, Relaxed);
    }

    /// Takes back a reservation granted at `at_ms` that was settled or released (the caller
    /// holds the owner's lock). One whose bucket was re-used already has stopped counting.
    pub fn remove(&self, at_ms: i64, lease_ms: i64) {
        let (i, start) = bucket(at_ms, lease_ms);
        if self.starts[i].load(Relaxed) == start {
            let n = self.counts[i].load(Relaxed);
            self.counts[i].store(n.saturating_sub(1), Relaxed);
        }
    }

    /// How long until the oldest counted reservation stops counting by its lease (at least
    /// 1 ms): when a caller refused for concurrency may be granted at the latest.
    pub fn next_expiry_ms(&self, now_ms: i64, lease_ms: i64) -> i64 {
        (0..BUCKETS)
            .filter(|&i| self.counts[i].load(Relaxed) > 0)
            .map(|i| self.starts[i].load(Relaxed))
            .filter(|&start| Self::live(start, now_ms, lease_ms))
            .map(|start| start + width(lease_ms) + lease_ms - now_ms)
            .min()
            .unwrap_or(1)
            .max(1)
    }

    /// Forgets everything (the slot is bound to another row).
    pub fn reset(&self) {
        for i in 0..BUCKETS {
            self.starts[i].store(0, Relaxed);
            self.counts[i].store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: i64 = 600_000;

    #[test]
    fn counts_until_settled() {
        let c = OpenCount::default();
        let t = 1_700_000_000_000;
        c.add(t, LEASE);
        c.add(t + 5, LEASE);
        assert_eq!(c.open(t + 10, LEASE), 2);
        c.remove(t, LEASE);
        assert_eq!(c.open(t + 10, LEASE), 1);
        c.remove(t + 5, LEASE);
        assert_eq!(c.open(t + 10, LEASE), 0);
        // Taking back more than was counted never wraps.
        c.remove(t + 5, LEASE);
        assert_eq!(c.open(t + 10, LEASE), 0);
    }

    #[test]
    fn an_unsettled_reservation_counts_through_its_lease_and_at_most_a_bucket_more() {
        let c = OpenCount::default();
        let t = 1_700_000_000_123;
        c.add(t, LEASE);
        assert_eq!(c.open(t + LEASE, LEASE), 1, "still within its lease");
        assert_eq!(
            c.open(t + LEASE + width(LEASE), LEASE),
            0,
            "gone a bucket after its lease"
        );
        let wait = c.next_expiry_ms(t + 1, LEASE);
        assert!(wait >= LEASE - 1 && wait <= LEASE + width(LEASE), "{wait}");
    }

    #[test]
    fn a_bucket_reused_a_lease_later_starts_from_zero() {
        let c = OpenCount::default();
        let t = 1_700_000_000_000;
        for _ in 0..3 {
            c.add(t, LEASE);
        }
        let later = t + width(LEASE) * BUCKETS as i64;
        c.add(later, LEASE);
        assert_eq!(c.open(later, LEASE), 1);
        // Settling the old ones now changes nothing.
        c.remove(t, LEASE);
        assert_eq!(c.open(later, LEASE), 1);
    }

    #[test]
    fn every_live_grant_is_counted_whatever_the_spacing() {
        let c = OpenCount::default();
        let t = 1_700_000_000_000;
        let step = LEASE / 40;
        for i in 0..40 {
            c.add(t + i * step, LEASE);
        }
        let now = t + 39 * step;
        // All 40 were granted within the last lease.
        assert_eq!(c.open(now, LEASE), 40);
    }
}
