//! Callers in shared memory: what each user of a pool with limits per minute (`minute_share`,
//! `user_rpm`, `user_tpm`, `user_max_concurrent`) took of it in the last rolling minute, and
//! how many reservations they hold open.
//!
//! An entry is made at a user's first grant in such a pool and is free again once its minute
//! has passed and nothing of it is open, so the table needs room for the users granted in any
//! one minute, not for all users. Each stripe (the member cache's stripes and locks: the same
//! hash, the same lock) has an index of 8-byte cells, in which a user lives within [`WINDOW`]
//! cells of their home, pointing at an entry of the stripe. Entries are handed out lowest
//! first, so the users of a minute sit together at the front of each stripe instead of across
//! all of it: the table is touched at random by every backend, and each page a backend touches
//! costs it a page fault the first time. An entry is 256 bytes; the open count of pools and
//! tokens that limit concurrency lives in a table beside it at the same index, touched only by
//! them. When every cell of a user's window is live, or every entry of the stripe, the user is
//! served untracked (counted in `keypool_status`): the keys' own limits still hold, only the
//! per-user ones do not.
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

/// Index cells a caller may live in, from its home cell.
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

/// Four cache lines: the first holds the entry's own fields and the log's head, length and base.
#[repr(C, align(64))]
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
    pub day_requests: u32,
    /// Grants of the last minute: one request each, and their tokens.
    pub log: CallerLog,
}

const _: () = assert!(std::mem::size_of::<Caller>() == 256);

impl Caller {
    /// Whether the entry holds nothing that still counts at `now_ms` (`open`: its open count).
    fn idle(&mut self, open: &OpenCount, now_ms: i64, lease_ms: i64) -> bool {
        if now_ms - self.asked_ms < WINDOW_MS {
            return false;
        }
        self.log.expire(now_ms);
        self.log.is_empty()
            && open.open(now_ms, lease_ms) == 0
            // An API token's requests of the day (its `rpd`) keep its entry for the day.
            && (self.pool_slot != TOKEN_SLOT || self.day_requests == 0 || self.day != utc_day(now_ms))
    }
}

#[repr(C)]
pub struct CallerCell(UnsafeCell<Caller>);

/// A cell of a stripe's index: 0 when empty, else the user's tag (32 bits of their hash) and
/// their entry's position in the stripe plus one.
#[repr(C)]
pub struct IndexCell(UnsafeCell<u64>);

/// A word of a stripe's bitmap of entries in use.
#[repr(C)]
pub struct UsedWord(UnsafeCell<u64>);

/// The tag a user's index cell holds (bits the stripe and home do not fix).
fn tag_of(hash: u64) -> u64 {
    (hash >> 10) & 0xffff_ffff
}

/// The stripes (locks shared with the member cache) and the entries.
pub struct CallerTable {
    pub pools: &'static [PoolSlot],
    pub locks: &'static [Lock],
    pub cells: &'static [CallerCell],
    /// Each stripe's index, as many cells as it has entries.
    pub index: &'static [IndexCell],
    /// Each stripe's entries in use, a bit each (a whole number of words per stripe).
    pub used: &'static [UsedWord],
    /// Each entry's reservations open now (for `user_max_concurrent` and a token's
    /// `max_concurrent`), at the entry's index.
    pub opens: &'static [OpenCount],
    /// Grants made without an entry (every entry of the window was live).
    pub untracked: &'static AtomicU64,
}

/// A locked stripe of the caller table.
pub struct CallerStripe<'a> {
    _guard: LockGuard<'a>,
    entries: StripeEntries<'a>,
}

impl<'a> std::ops::Deref for CallerStripe<'a> {
    type Target = StripeEntries<'a>;

    fn deref(&self) -> &StripeEntries<'a> {
        &self.entries
    }
}

/// A stripe's index and entries (used while its lock is held).
pub struct StripeEntries<'a> {
    pools: &'static [PoolSlot],
    cells: &'a [CallerCell],
    opens: &'a [OpenCount],
    index: &'a [IndexCell],
    used: &'a [UsedWord],
    first: usize,
}

/// Words of the in-use bitmap per stripe of `per` entries.
pub fn used_words(per: usize) -> usize {
    per.div_ceil(64)
}

impl CallerTable {
    /// Locks the stripe of `hash`.
    pub fn stripe(&self, hash: u64) -> CallerStripe<'_> {
        let stripes = self.locks.len();
        let s = (hash % stripes as u64) as usize;
        let per = self.cells.len() / stripes;
        let words = used_words(per);
        CallerStripe {
            _guard: self.locks[s].exclusive(),
            entries: StripeEntries {
                pools: self.pools,
                cells: &self.cells[s * per..(s + 1) * per],
                opens: &self.opens[s * per..(s + 1) * per],
                index: &self.index[s * per..(s + 1) * per],
                used: &self.used[s * words..(s + 1) * words],
                first: s * per,
            },
        }
    }
}

impl StripeEntries<'_> {
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

    /// The index cells of `hash`'s window.
    fn window(&self, hash: u64) -> impl Iterator<Item = usize> {
        let n = self.index.len();
        let home = ((hash >> 32) % n as u64) as usize;
        (0..WINDOW.min(n)).map(move |step| (home + step) % n)
    }

    #[allow(clippy::mut_from_ref)]
    fn cell(&self, k: usize) -> &mut u64 {
        // SAFETY: the stripe lock is held for the lifetime of `self`.
        unsafe { &mut *self.index[k].0.get() }
    }

    #[allow(clippy::mut_from_ref)]
    fn used_word(&self, w: usize) -> &mut u64 {
        // SAFETY: as `cell`.
        unsafe { &mut *self.used[w].0.get() }
    }

    /// The entry position a live index cell points at.
    fn position_in(cell: u64) -> Option<usize> {
        match cell & 0xffff_ffff {
            0 => None,
            p => Some(p as usize - 1),
        }
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
        let tag = tag_of(hash);
        self.window(hash).find_map(|k| {
            let cell = *self.cell(k);
            let i = Self::position_in(cell).filter(|_| cell >> 32 == tag)?;
            self.current(self.at(i), hash, pool_slot).then_some(i)
        })
    }

    /// Whether the entry at position `i` holds nothing that still counts: its pool slot was
    /// reloaded, or its minute passed with nothing open.
    fn reclaimable(&self, i: usize, now_ms: i64, lease_ms: i64) -> bool {
        let c = self.at(i);
        self.gen_of(c.pool_slot) != Some(c.pool_gen) || c.idle(&self.opens[i], now_ms, lease_ms)
    }

    /// Empties index cell `k` and frees its entry.
    fn release(&self, k: usize) {
        if let Some(i) = Self::position_in(*self.cell(k)) {
            *self.used_word(i / 64) &= !(1u64 << (i % 64));
            // A reservation's mark of this user no longer finds the entry.
            self.at(i).hash = 0;
        }
        *self.cell(k) = 0;
    }

    /// The lowest free entry, marked used.
    fn allocate(&self) -> Option<usize> {
        let n = self.cells.len();
        for w in 0..self.used.len() {
            let word = self.used_word(w);
            let i = w * 64 + (!*word).trailing_zeros() as usize;
            if *word != u64::MAX && i < n {
                *word |= 1u64 << (i % 64);
                return Some(i);
            }
        }
        None
    }

    /// The user's entry, or a new one; `None` when every cell of the user's window is live.
    /// The window's idle entries are freed on the way (so that entries stay at the front).
    pub fn find_or_insert(&self, hash: u64, pool_slot: u32, now_ms: i64, lease_ms: i64) -> Option<usize> {
        if let Some(i) = self.find(hash, pool_slot) {
            return Some(i);
        }
        let gen = self.gen_of(pool_slot)?;
        let mut free = None;
        for k in self.window(hash) {
            let empty = match Self::position_in(*self.cell(k)) {
                None => true,
                Some(i) if self.reclaimable(i, now_ms, lease_ms) => {
                    self.release(k);
                    true
                }
                Some(_) => false,
            };
            if empty && free.is_none() {
                free = Some(k);
            }
        }
        let k = free?;
        // As many entries as cells, one per live cell: an empty cell means a free entry.
        let i = self.allocate()?;
        *self.cell(k) = (tag_of(hash) << 32) | (i as u64 + 1);
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

    /// A stripe of `n` entries outside shared memory (API tokens' entries: no pool slots).
    fn stripe(n: usize) -> StripeEntries<'static> {
        fn leak<T>(v: impl Iterator<Item = T>) -> &'static [T] {
            Vec::leak(v.collect())
        }
        StripeEntries {
            pools: &[],
            cells: leak((0..n).map(|_| CallerCell(UnsafeCell::new(Caller::default())))),
            opens: leak((0..n).map(|_| OpenCount::default())),
            index: leak((0..n).map(|_| IndexCell(UnsafeCell::new(0)))),
            used: leak((0..used_words(n)).map(|_| UsedWord(UnsafeCell::new(0)))),
            first: 0,
        }
    }

    /// A hash whose home cell is `home`.
    fn hash(home: u64, n: u64, salt: u64) -> u64 {
        ((home + n * salt) << 32) | (salt << 10) | 1
    }

    fn insert(s: &StripeEntries<'_>, h: u64, now: i64) -> Option<usize> {
        let i = s.find_or_insert(h, TOKEN_SLOT, now, LEASE)?;
        let c = s.at(i);
        c.asked_ms = now;
        c.log.charge(now, 1, 0);
        Some(i)
    }

    #[test]
    fn entries_are_handed_out_lowest_first_and_found_again() {
        let s = stripe(256);
        let users: Vec<u64> = (0..100).map(|u| hash((u * 37) % 256, 256, u + 1)).collect();
        let positions: Vec<usize> = users.iter().map(|&h| insert(&s, h, T).unwrap()).collect();
        // Dense: the 100 users of the minute hold the first 100 entries, whatever their homes.
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        for (&h, &i) in users.iter().zip(&positions) {
            assert_eq!(s.find(h, TOKEN_SLOT), Some(i));
            assert_eq!(
                s.find_or_insert(h, TOKEN_SLOT, T + 1, LEASE),
                Some(i),
                "no second entry"
            );
        }
        assert_eq!(s.find(hash(5, 256, 999), TOKEN_SLOT), None);
    }

    #[test]
    fn a_minute_later_entries_are_reused_and_marks_of_the_old_user_find_nothing() {
        let s = stripe(64);
        let old: Vec<u64> = (0..64).map(|u| hash(u, 64, u + 1)).collect();
        for &h in &old {
            insert(&s, h, T).unwrap();
        }
        // Full: a new user gets no entry while the minute lasts.
        let newcomer = hash(3, 64, 500);
        assert_eq!(insert(&s, newcomer, T + 59_999), None);
        // A minute later the idle entries are free again: the newcomer takes one.
        let before: Vec<usize> = old.iter().map(|&h| s.find(h, TOKEN_SLOT).unwrap()).collect();
        let at = insert(&s, newcomer, T + WINDOW_MS).unwrap();
        let previous = before.iter().position(|&i| i == at).unwrap();
        // The user who held it is gone, and a reservation of theirs no longer finds it.
        let mark = CallerMark {
            index: at as u32,
            hash: old[previous],
            at_ms: T,
        };
        assert_eq!(s.holding(&mark, TOKEN_SLOT), None);
        assert_eq!(s.find(old[previous], TOKEN_SLOT), None);
        assert_eq!(s.find(newcomer, TOKEN_SLOT), Some(at));
    }

    #[test]
    fn a_full_window_of_live_users_leaves_a_user_untracked_an_open_reservation_keeps_its_entry() {
        let s = stripe(64);
        // WINDOW users at the same home fill its window of cells.
        let crowd: Vec<u64> = (0..WINDOW as u64).map(|u| hash(7, 64, u + 1)).collect();
        for &h in &crowd {
            insert(&s, h, T).unwrap();
        }
        assert_eq!(insert(&s, hash(7, 64, 100), T + 1), None);
        // One of them holds a reservation open past the minute: its entry stays.
        let keeper = s.find(crowd[0], TOKEN_SLOT).unwrap();
        s.open_at(keeper).add(T, LEASE);
        let later = T + WINDOW_MS;
        let fresh: Vec<usize> = (0..WINDOW as u64 - 1)
            .map(|u| insert(&s, hash(7, 64, 200 + u), later).unwrap())
            .collect();
        assert!(!fresh.contains(&keeper));
        assert_eq!(s.find(crowd[0], TOKEN_SLOT), Some(keeper));
        assert_eq!(insert(&s, hash(7, 64, 300), later), None);
    }

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
        assert!(
            !user.idle(&open, T + WINDOW_MS, LEASE),
            "a reservation still open keeps the entry"
        );
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
