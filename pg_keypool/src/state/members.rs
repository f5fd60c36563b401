//! Pool members in shared memory: a cache of the members active recently (who is assigned to
//! which key, their weight class, the day they were last active, what they used of their share
//! today), of the guests of the day, and of the guests of pools without shares (an entry that
//! only says the user is not a member, so that their reservations do not read the table again). `keypool.member` is the truth; a member the cache does
//! not hold is read from it on their first reservation (member_cache.rs) and evicted again when
//! room is short. Each pool's aggregates (members per weight class and day of last activity,
//! shares.rs) and each key's count of members (shmem.rs) count every member, cached or not.
//!
//! The table is split into [`STRIPES`] stripes, each with its own LWLock and an equal share of
//! the entries. A user lives within [`WINDOW`] entries of its home position in the stripe its
//! hash selects (linear probing, bounded): finding, inserting and evicting look at one window,
//! whatever the number of members. An entry is never emptied, only re-used:
//! - entries of a pool slot that was reloaded or re-bound (its generation moved on) are stale;
//! - entries of guests are stale two days later (31 when they hold spend of a budget);
//! - a member's entry may be evicted when it is *clean* (everything in it is in the tables:
//!   no FLAG_*_DIRTY) and not pinned by a transaction in flight; the least recently used of the
//!   window goes first. The flusher (history.rs) cleans entries every flush_interval.
//!
//! Members come first. A guest gets an entry only while a quarter of its window is free (or
//! held by members not active since yesterday); a member takes any clean entry (a guest's use
//! of the day moves to its pool's shared guest allowance, quota.rs). So no number of distinct
//! guest ids can take the room members need: guests that cannot be tracked one by one share
//! one allowance per pool.
//!
//! Users are identified by a 64-bit SipHash of (installation, pool, user id), also stored in
//! `keypool.member.user_hash` so that lookups and background work can find their rows.

use std::cell::UnsafeCell;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::policy::shares::{Policy, PoolShares, NEVER, WEIGHT_SCALE};
use crate::state::lock::{Lock, LockGuard};
use crate::state::slots::{Header, PoolSlot};

pub const STRIPES: usize = 1024;
/// Entries a user may live in, from its home position.
pub const WINDOW: usize = 64;

/// The entry is a member of its pool (otherwise a guest tracked for the day).
pub const FLAG_MEMBER: u8 = 1;
/// `last_active` changed since it was last written to `keypool.member`.
pub const FLAG_ACTIVE_DIRTY: u8 = 2;
/// `used` changed since it was last written to `keypool.member` (history.rs).
pub const FLAG_USE_DIRTY: u8 = 4;
/// `spent` changed since it was last written to `keypool.user_spend` (history.rs).
pub const FLAG_SPEND_DIRTY: u8 = 8;
/// A transaction in flight changed the entry (assign.rs): kept until it ends.
pub const FLAG_PINNED: u8 = 16;
/// What must reach the tables before a member's entry may be evicted.
const DIRTY: u8 = FLAG_ACTIVE_DIRTY | FLAG_USE_DIRTY | FLAG_SPEND_DIRTY;
/// How long a guest's entry is kept for what it spent (the longest budget period).
const SPEND_KEPT_DAYS: i32 = 31;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Member {
    /// 0: never used.
    pub hash: u64,
    pub pool_slot: u32,
    pub pool_gen: u32,
    /// The assigned key (0: none).
    pub key_id: i64,
    pub class: u8,
    pub flags: u8,
    /// When the entry was last used, in minutes (wrapping; for eviction).
    pub touched: u16,
    /// Day number of the last reservation, or NEVER. A guest's entry: the day it was last seen
    /// in a pool without shares (kept so that it is not read from the table again).
    pub last_active: i32,
    /// The day `used` and `share` are for, or NEVER.
    pub day: i32,
    /// The day number the budget period of `spent` began on (0: nothing spent yet).
    pub spent_from: i32,
    pub used: u64,
    pub share: u64,
    /// What the user spent of their budget in that period, in millionths (budgets.rs).
    pub spent: u64,
}

impl Member {
    pub fn is_member(&self) -> bool {
        self.flags & FLAG_MEMBER != 0
    }

    /// Whether the entry may be given to another user: not pinned by a transaction in flight,
    /// and holding nothing the tables do not (a guest's use of the day is not kept in a table:
    /// it moves to its pool's shared allowance, [`Stripe::evict`]).
    fn evictable(&self) -> bool {
        let kept = if self.is_member() { DIRTY } else { FLAG_SPEND_DIRTY };
        self.flags & (kept | FLAG_PINNED) == 0
    }

    /// Drops the entry if it holds nothing the tables do not (the user's next reservation reads
    /// them again); false when it holds use not flushed yet.
    pub fn forget(&mut self) -> bool {
        if self.flags & DIRTY != 0 {
            return false;
        }
        // Never matches a pool again; the hash stays, so that probing still passes it.
        self.pool_slot = u32::MAX;
        true
    }
}

// One cache line per entry.
const _: () = assert!(std::mem::size_of::<Member>() == 64);

#[repr(C)]
pub struct MemberCell(UnsafeCell<Member>);

/// Per-stripe counters and the stripe's membership epoch, on a cache line of their own.
#[repr(C, align(64))]
#[derive(Default)]
pub struct StripeStats {
    /// Bumped when a transaction that changed a membership of this stripe ends, so that a
    /// lookup that raced with it is done again (member_cache.rs).
    pub epoch: AtomicU64,
    /// Reservations that found their user's entry.
    pub hits: AtomicU64,
    /// Members read from `keypool.member` into the cache.
    pub loads: AtomicU64,
    /// Clean entries of members or guests given to another user.
    pub evictions: AtomicU64,
    /// Members served without an entry (every entry of the window held unflushed use).
    pub uncached: AtomicU64,
}

/// The stripe locks, their counters and the entries.
pub struct MemberTable {
    /// The pools' slots (an entry belongs to a pool slot and its generation).
    pub pools: &'static [PoolSlot],
    pub header: &'static Header,
    pub locks: &'static [Lock],
    pub stats: &'static [StripeStats],
    pub cells: &'static [MemberCell],
}

/// A time in milliseconds as the minute kept in `Member::touched` (callers pass the real
/// clock, not a test clock).
pub fn minute(ms: i64) -> u16 {
    (ms.div_euclid(60_000) & 0xffff) as u16
}

/// The hash that identifies a user of a pool.
pub fn user_hash(instance: i64, pool_id: i64, user_id: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    instance.hash(&mut h);
    pool_id.hash(&mut h);
    user_id.hash(&mut h);
    match h.finish() {
        0 => 1,
        v => v,
    }
}

/// `user_hash` as stored in a bigint column.
pub fn hash_to_sql(hash: u64) -> i64 {
    hash as i64
}

pub fn hash_from_sql(v: i64) -> u64 {
    v as u64
}

fn stripe_of(hash: u64) -> usize {
    (hash % STRIPES as u64) as usize
}

impl MemberTable {
    fn per_stripe(&self) -> usize {
        self.cells.len() / STRIPES
    }

    fn stripe_number<'a>(&'a self, s: usize, guard: Option<LockGuard<'a>>) -> Stripe<'a> {
        let per = self.per_stripe();
        Stripe {
            _guard: guard,
            pools: self.pools,
            header: self.header,
            cells: &self.cells[s * per..(s + 1) * per],
            first: s * per,
            stats: &self.stats[s],
        }
    }

    /// Locks the stripe of `hash`.
    pub fn stripe(&self, hash: u64) -> Stripe<'_> {
        let s = stripe_of(hash);
        self.stripe_number(s, Some(self.locks[s].exclusive()))
    }

    /// The counters of the stripe of `hash` (no lock needed).
    pub fn stats_of(&self, hash: u64) -> &StripeStats {
        &self.stats[stripe_of(hash)]
    }

    /// Stripe number `s` without its lock: only for the postmaster, when no backend runs.
    pub fn stripe_at_unlocked(&self, s: usize) -> Stripe<'_> {
        self.stripe_number(s, None)
    }

    /// Locks stripe number `s` (for scans).
    pub fn stripe_at(&self, s: usize) -> Stripe<'_> {
        self.stripe_number(s, Some(self.locks[s].exclusive()))
    }

    /// Bumps the membership epoch of the stripe of each hash (once per stripe).
    pub fn bump_epochs(&self, hashes: impl Iterator<Item = u64>) {
        let mut seen = std::collections::HashSet::new();
        for h in hashes {
            let s = stripe_of(h);
            if seen.insert(s) {
                self.stats[s].epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Sums of the per-stripe counters: (hits, loads, evictions, uncached).
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        self.stats.iter().fold((0, 0, 0, 0), |t, s| {
            (
                t.0 + s.hits.load(Ordering::Relaxed),
                t.1 + s.loads.load(Ordering::Relaxed),
                t.2 + s.evictions.load(Ordering::Relaxed),
                t.3 + s.uncached.load(Ordering::Relaxed),
            )
        })
    }
}

/// A locked stripe.
pub struct Stripe<'a> {
    _guard: Option<LockGuard<'a>>,
    pools: &'static [PoolSlot],
    header: &'static Header,
    cells: &'a [MemberCell],
    first: usize,
    pub stats: &'a StripeStats,
}

impl<'a> Stripe<'a> {
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    fn window(&self) -> usize {
        self.cells.len().min(WINDOW)
    }

    /// The entry at position `i` of the stripe.
    #[allow(clippy::mut_from_ref)]
    pub fn at(&self, i: usize) -> &mut Member {
        // SAFETY: the stripe lock is held for the lifetime of `self`.
        unsafe { &mut *self.cells[i].0.get() }
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

    fn home(&self, hash: u64) -> usize {
        ((hash / STRIPES as u64) % self.cells.len() as u64) as usize
    }

    /// The positions of the window of `hash`, from its home.
    fn positions(&self, hash: u64) -> impl Iterator<Item = usize> {
        let (n, home) = (self.cells.len(), self.home(hash));
        (0..self.window()).map(move |step| (home + step) % n)
    }

    /// Finds the current entry of a user.
    pub fn find(&self, hash: u64, pool_slot: u32) -> Option<usize> {
        let gen = self.pools[pool_slot as usize].members_gen.load(Ordering::Acquire);
        for i in self.positions(hash) {
            let m = self.at(i);
            if m.hash == 0 {
                // Entries are never emptied: nothing was ever placed from here on.
                return None;
            }
            if m.hash == hash && m.pool_slot == pool_slot && m.pool_gen == gen {
                return Some(i);
            }
        }
        None
    }

    /// Makes an entry for a member read from the table (or restored), evicting the least
    /// recently used clean entry of the window when none is free; `None` when every entry of
    /// the window holds what the tables do not have yet.
    pub fn insert_member(&self, hash: u64, pool_slot: u32, today: i32, now_min: u16) -> Option<usize> {
        if let Some(i) = self.find(hash, pool_slot) {
            return Some(i);
        }
        let i = self.free_cell(hash, today).or_else(|| self.evict(hash, now_min))?;
        self.init(i, hash, pool_slot, now_min);
        self.at(i).flags = FLAG_MEMBER;
        Some(i)
    }

    /// Finds the entry of a guest, or makes one while the window keeps room for members (a
    /// quarter of it free, or held by members not active since yesterday); `None` otherwise:
    /// the guest cannot be tracked one by one.
    pub fn find_or_insert_guest(&self, hash: u64, pool_slot: u32, today: i32, now_min: u16) -> Option<usize> {
        if let Some(i) = self.find(hash, pool_slot) {
            return Some(i);
        }
        let room = self.guest_room(hash, today)?;
        let i = self
            .free_cell(hash, today)
            .unwrap_or_else(|| self.oldest(&room, now_min));
        if self.at(i).hash != 0 && !is_stale(self.pools, self.at(i), today) {
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.init(i, hash, pool_slot, now_min);
        Some(i)
    }

    /// Entries of the window of `hash` a guest may take (free, stale, or held by clean members
    /// not active since yesterday), if more than a quarter of the window is such room.
    fn guest_room(&self, hash: u64, today: i32) -> Option<Vec<usize>> {
        let room: Vec<usize> = self
            .positions(hash)
            .filter(|&i| {
                let m = self.at(i);
                m.hash == 0 || is_stale(self.pools, m, today) || idle_member(m, today) || empty_guest(m)
            })
            .collect();
        (room.len() > (self.window() / 4).max(1)).then_some(room)
    }

    /// Whether a guest not cached yet would get an entry of its own.
    pub fn has_guest_room(&self, hash: u64, today: i32) -> bool {
        self.guest_room(hash, today).is_some()
    }

    /// Entries holding members and live guests.
    pub fn counts(&self, today: i32) -> (usize, usize) {
        let (mut members, mut guests) = (0, 0);
        for i in 0..self.cells.len() {
            let m = self.at(i);
            if m.hash == 0 || is_stale(self.pools, m, today) {
                continue;
            }
            if m.is_member() {
                members += 1;
            } else {
                guests += 1;
            }
        }
        (members, guests)
    }

    /// The first free (or stale) entry of the window of `hash`.
    fn free_cell(&self, hash: u64, today: i32) -> Option<usize> {
        self.positions(hash).find(|&i| {
            let m = self.at(i);
            m.hash == 0 || is_stale(self.pools, m, today)
        })
    }

    /// The least recently used of `candidates`.
    fn oldest(&self, candidates: &[usize], now_min: u16) -> usize {
        candidates
            .iter()
            .copied()
            .max_by_key(|&i| now_min.wrapping_sub(self.at(i).touched))
            .unwrap_or(candidates[0])
    }

    /// Gives the least recently used clean entry of the window to another user: a member's
    /// entry holds nothing the tables do not; what a guest used today moves to its pool's
    /// shared guest allowance, so that it still counts.
    fn evict(&self, hash: u64, now_min: u16) -> Option<usize> {
        let candidates: Vec<usize> = self.positions(hash).filter(|&i| self.at(i).evictable()).collect();
        if candidates.is_empty() {
            return None;
        }
        let i = self.oldest(&candidates, now_min);
        let m = self.at(i);
        if !m.is_member() {
            if (m.pool_slot as usize) < self.pools.len() && m.day != NEVER && m.used > 0 {
                self.pools[m.pool_slot as usize].guests_add(m.day, m.used);
            }
            self.header.guests_evicted.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        Some(i)
    }

    fn init(&self, i: usize, hash: u64, pool_slot: u32, now_min: u16) {
        let gen = self.pools[pool_slot as usize].members_gen.load(Ordering::Acquire);
        *self.at(i) = Member {
            hash,
            pool_slot,
            pool_gen: gen,
            key_id: 0,
            class: 0,
            flags: 0,
            touched: now_min,
            last_active: NEVER,
            day: NEVER,
            spent_from: 0,
            used: 0,
            share: 0,
            spent: 0,
        };
    }
}

/// A clean member entry not used today or yesterday: room a guest may take.
fn idle_member(m: &Member, today: i32) -> bool {
    m.is_member() && m.evictable() && m.day < today.saturating_sub(1) && m.last_active < today.saturating_sub(1)
}

/// A guest's entry that only says the user is not a member (a pool without shares, nothing
/// spent): any other guest may take it.
fn empty_guest(m: &Member) -> bool {
    !m.is_member() && m.day == NEVER && m.spent == 0 && m.flags & FLAG_PINNED == 0
}

/// Remembers that a guest of a pool without shares was seen today (see `last_active`).
pub fn seen(m: &mut Member, today: i32) {
    if !m.is_member() && m.last_active != today {
        m.last_active = today;
    }
}

/// An entry that holds nothing worth keeping.
fn is_stale(pools: &[PoolSlot], m: &Member, today: i32) -> bool {
    if (m.pool_slot as usize) >= pools.len()
        || pools[m.pool_slot as usize].members_gen.load(Ordering::Acquire) != m.pool_gen
    {
        return true;
    }
    let spending = m.spent > 0 && m.spent_from >= today.saturating_sub(SPEND_KEPT_DAYS);
    let recent = |day: i32| day != NEVER && day >= today.saturating_sub(1);
    !m.is_member() && !spending && !recent(m.day) && !recent(m.last_active)
}

/// First reservation of the day: the member counts as active today and gets today's share.
pub fn activate(shares: &mut PoolShares, policy: &Policy, m: &mut Member, today: i32) -> u64 {
    let weight = if m.is_member() {
        shares.touch(u16::from(m.class), m.last_active, today);
        if m.last_active != today {
            m.last_active = today;
            m.flags |= FLAG_ACTIVE_DIRTY;
        }
        shares.classes[m.class as usize].weight_milli
    } else {
        WEIGHT_SCALE
    };
    let counted = shares.counted_weight(today, policy.window_days);
    let total = if m.is_member() { counted } else { counted + weight };
    let share = PoolShares::share(policy, weight, total).unwrap_or(0);
    m.day = today;
    m.used = 0;
    m.share = share;
    share
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_differ_by_pool_and_installation() {
        let a = user_hash(1, 1, "user-42");
        assert_eq!(a, user_hash(1, 1, "user-42"));
        assert_ne!(a, user_hash(1, 2, "user-42"));
        assert_ne!(a, user_hash(2, 1, "user-42"));
        assert_ne!(a, user_hash(1, 1, "user-43"));
        assert_eq!(hash_from_sql(hash_to_sql(a)), a);
    }
}
