//! Callers in shared memory: what each user of a pool with limits per minute (`minute_share`,
//! `user_rpm`, `user_tpm`, `user_max_concurrent`) took of it in the last rolling minute, and
//! how many reservations they hold open.
//!
//! An entry is made at a user's first grant in such a pool and is free again once its minute
//! has passed and nothing of it is open, so the table needs room for the users granted in any
//! one minute, not for all users. A user lives within the stripe its hash selects (the member
//! cache's stripes and locks: the same hash, the same lock), within [`WINDOW`] entries of its
//! home. When every entry of a window is live the user is served untracked (counted in
//! `keypool_status`): the keys' own limits still hold, only the per-user ones do not.
//!
//! An entry is small (264 bytes: the table is touched at random, one entry per user granted
//! in the minute); the open count of pools and tokens that limit concurrency lives in a table
//! beside it at the same index, touched only by them.
//!
//! Each pool slot also counts its *active* callers (those who asked in the last ten seconds,
//! slots.rs), in one-second buckets moved along as each asks again, so that a fair share of
//! the minute is the pool's capacity over that count (policy/minute.rs).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::window::{CallerLog, WINDOW_MS};
use crate::state::lock::{Lock, LockGuard};
use crate::state::open_count::OpenCount;
use crate::state::slots::PoolSlot;

/// Entries a caller may live in, from its home position.
pub const WINDOW: usize = 16;
/// The `pool_slot` of an API token's entry (its limits hold across pools).
pub const TOKEN_SLOT: u32 = u32::MAX - 1;
const DAY_MS: i64 = 86_400_000;

/// The UTC day number of a time.
pub fn utc_day(ms: i64) -> i32 {
    ms.div_euclid(DAY_MS) as i32
}

/// When the UTC day of `ms` ends.
pub fn utc_day_end(ms: i64) -> i64 {
    (ms.div_euclid(DAY_MS) + 1) * DAY_MS
}

/// A grant counted in a caller entry: the entry, the user's hash, and when (reservations
/// remember it to correct the count when they are settled or released).
#[derive(Clone, Copy, Debug)]
pub struct CallerMark {
    pub index: u32,
    pub hash: u64,
    pub at_ms: i64,
}

impl CallerMark {
    pub const NONE: CallerMark = CallerMark {
        index: u32::MAX,
        hash: 0,
        at_ms: 0,
    };

    pub fn is_some(&self) -> bool {
        self.index != u32::MAX
    }
}

#[repr(C)]
#[derive(Default)]
pub struct Caller {
    /// The user's hash in the pool (members.rs); 0: never used.
    pub hash: u64,
    pub pool_slot: u32,
    pub pool_gen: u32,
    /// When the user last asked, granted or not (0: not in memory).
    pub asked_ms: i64,
    /// The user's weight in the pool's fair shares, in thousandths (read when the entry was
    /// made).
    pub weight: u32,
    /// An API token's requests of the UTC day `day` (for its `rpd`).
    pub day: i32,
    pub day_requests: u64,
    /// Grants of the last minute: one request each, and their tokens.
    pub log: CallerLog,
}

const _: () = assert!(std::mem::size_of::<Caller>() <= 264);

impl Caller {
    /// Whether the entry holds nothing that still counts at `now_ms` (`open`: its open count).
    fn idle(&mut self, open: &OpenCount, now_ms: i64, lease_ms: i64) -> bool {
        self.log.expire(now_ms);
        self.log.is_empty()
            && open.open(now_ms, lease_ms) == 0
            && now_ms - self.asked_ms >= WINDOW_MS
            // An API token's requests of the day (its `rpd`) keep its entry for the day.
            && (self.pool_slot != TOKEN_SLOT || self.day_requests == 0 || self.day != utc_day(now_ms))
    }
}

#[repr(C)]
pub struct CallerCell(UnsafeCell<Caller>);

/// The stripes (locks shared with the member cache) and the entries.
pub struct CallerTable {
    pub pools: &'static [PoolSlot],
    pub locks: &'static [Lock],
    pub cells: &'static [CallerCell],
    /// Each entry's reservations open now (for `user_max_concurrent` and a token's
    /// `max_concurrent`), at the entry's index.
    pub opens: &'static [OpenCount],
    /// Grants made without an entry (every entry of the window was live).
    pub untracked: &'static AtomicU64,
}

/// A locked stripe of the caller table.
pub struct CallerStripe<'a> {
    _guard: LockGuard<'a>,
    pools: &'static [PoolSlot],
    cells: &'a [CallerCell],
    opens: &'a [OpenCount],
    first: usize,
}

impl CallerTable {
    /// Locks the stripe of `hash`.
    pub fn stripe(&self, hash: u64) -> CallerStripe<'_> {
        let stripes = self.locks.len();
        let s = (hash % stripes as u64) as usize;
        let per = self.cells.len() / stripes;
        CallerStripe {
            _guard: self.locks[s].exclusive(),
            pools: self.pools,
            cells: &self.cells[s * per..(s + 1) * per],
            opens: &self.opens[s * per..(s + 1) * per],
            first: s * per,
        }
    }
}

impl CallerStripe<'_> {
    #[allow(clippy::mut_from_ref)]
    pub fn at(&self, i: usize) -> &mut Caller {
        // SAFETY: the stripe lock is held for the lifetime of `self`.
        unsafe { &mut *self.cells[i].0.get() }
    }

    /// The open count of the entry at stripe position `i` (changed under the stripe lock).
    pub fn open_at(&self, i: usize) -> &OpenCount {
        &self.opens[i]
    }

    /// The absolute index of stripe position `i` (what reservations remember).
    pub fn index_of(&self, i: usize) -> u32 {
        (self.first + i) as u32
    }

    /// The stripe position of an absolute index, if it is in this stripe.
    pub fn position_of(&self, index: u32) -> Option<usize> {
        let i = (index as usize).checked_sub(self.first)?;
        (i < self.cells.len()).then_some(i)
    }

    fn positions(&self, hash: u64) -> impl Iterator<Item = usize> {
        let n = self.cells.len();
        let home = ((hash >> 32) % n as u64) as usize;
        (0..WINDOW.min(n)).map(move |step| (home + step) % n)
    }

    /// The generation of the pool slot's entries (API tokens' entries have none).
    fn gen_of(&self, pool_slot: u32) -> Option<u32> {
        match self.pools.get(pool_slot as usize) {
            Some(p) => Some(p.members_gen.load(Ordering::Acquire)),
            None if pool_slot == TOKEN_SLOT => Some(0),
            None => None,
        }
    }

    fn current(&self, c: &Caller, hash: u64, pool_slot: u32) -> bool {
        c.hash == hash && c.pool_slot == pool_slot && self.gen_of(pool_slot) == Some(c.pool_gen)
    }

    /// The position of the entry `mark` was counted in, if it still holds that user of that
    /// pool.
    pub fn holding(&self, mark: &CallerMark, pool_slot: u32) -> Option<usize> {
        let i = self.position_of(mark.index)?;
        self.current(self.at(i), mark.hash, pool_slot).then_some(i)
    }

    /// The user's entry, if they have one.
    pub fn find(&self, hash: u64, pool_slot: u32) -> Option<usize> {
        self.positions(hash)
            .find(|&i| self.current(self.at(i), hash, pool_slot))
    }

    /// The user's entry, or a new one in an idle entry of their window; `None` when every
    /// entry of the window is live.
    pub fn find_or_insert(&self, hash: u64, pool_slot: u32, now_ms: i64, lease_ms: i64) -> Option<usize> {
        if let Some(i) = self.find(hash, pool_slot) {
            return Some(i);
        }
        let gen = self.gen_of(pool_slot)?;
        let i = self.positions(hash).find(|&i| {
            let c = self.at(i);
            c.hash == 0 || self.gen_of(c.pool_slot) != Some(c.pool_gen) || c.idle(&self.opens[i], now_ms, lease_ms)
        })?;
        let c = self.at(i);
        c.hash = hash;
        c.pool_slot = pool_slot;
        c.pool_gen = gen;
        c.asked_ms = 0;
        c.weight = 0;
        c.log = CallerLog::default();
        self.opens[i].reset();
        c.day = 0;
        c.day_requests = 0;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_800_000_000_000;
    const LEASE: i64 = 600_000;

    #[test]
    fn a_users_entry_is_free_a_minute_after_its_last_request_a_tokens_day_keeps_it() {
        let mut user = Caller {
            hash: 7,
            pool_slot: 0,
            asked_ms: T,
            ..Default::default()
        };
        user.log.charge(T, 1, 10);
        let open = OpenCount::default();
        assert!(!user.idle(&open, T + 59_999, LEASE));
        assert!(user.idle(&open, T + WINDOW_MS, LEASE));
        open.add(T + 30_000, LEASE);
        assert!(!user.idle(&open, T + WINDOW_MS, LEASE), "a reservation still open keeps the entry");
        // An API token with an `rpd` keeps its day's count (and entry) until the UTC day ends.
        let mut token = Caller {
            hash: 8,
            pool_slot: TOKEN_SLOT,
            asked_ms: T,
            day: utc_day(T),
            day_requests: 3,
            ..Default::default()
        };
        token.log.charge(T, 1, 10);
        let none = OpenCount::default();
        assert!(!token.idle(&none, T + WINDOW_MS, LEASE));
        assert!(token.idle(&none, utc_day_end(T) + WINDOW_MS, LEASE));
    }
}
