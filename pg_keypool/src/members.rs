//! Pool members in shared memory: who is assigned to which key, their weight class, the day
//! they were last active, and what they used of their share today. Reservations find a user
//! here, never in a table.
//!
//! The table is split into [`STRIPES`] stripes, each with its own LWLock and an equal share of
//! the entries; a user lives in the stripe its hash selects, at the first free place from its
//! home position (linear probing within the stripe). An entry is never emptied, only re-used:
//! - entries of a pool slot that was reloaded or re-bound (its generation moved on) are stale;
//! - entries of users who are not members (guests, tracked for their share of a day) are stale
//!   two days later.
//!
//! Members come first. A guest gets an entry of its own only while a quarter of its stripe
//! stays free ([`Stripe::guest_room`]); a member that finds its stripe full takes over a guest's
//! entry (the guest's use of the day moves to its pool's shared guest allowance, quota.rs). So
//! no number of distinct guest ids can take the room members need: guests that cannot be
//! tracked one by one share one allowance per pool.
//!
//! Users are identified by a 64-bit SipHash of (installation, pool, user id), also stored in
//! `keypool.member.user_hash` so that background work can find their rows.

use std::cell::UnsafeCell;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;

use crate::errors::{self, Code};
use crate::shares::{Policy, PoolShares, NEVER, WEIGHT_SCALE};
use crate::shmem::{Lock, LockGuard, Shared};

pub const STRIPES: usize = 1024;

/// The entry is a member of its pool (otherwise a guest tracked for the day).
pub const FLAG_MEMBER: u16 = 1;
/// `last_active` changed since it was last written to `keypool.member`.
pub const FLAG_ACTIVE_DIRTY: u16 = 2;
/// `used` changed since it was last written to `keypool.member` (history.rs).
pub const FLAG_USE_DIRTY: u16 = 4;
/// `spent` changed since it was last written to `keypool.user_spend` (history.rs).
pub const FLAG_SPEND_DIRTY: u16 = 8;
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
    pub class: u16,
    pub flags: u16,
    /// Day number of the last reservation, or NEVER.
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
}

#[repr(C)]
pub struct MemberCell(UnsafeCell<Member>);

/// The stripe locks and the entries.
pub struct MemberTable {
    pub locks: &'static [Lock],
    pub cells: &'static [MemberCell],
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

impl MemberTable {
    fn per_stripe(&self) -> usize {
        self.cells.len() / STRIPES
    }

    /// Locks the stripe of `hash`.
    pub fn stripe(&self, hash: u64) -> Stripe<'_> {
        let s = (hash % STRIPES as u64) as usize;
        let per = self.per_stripe();
        Stripe {
            _guard: Some(self.locks[s].exclusive()),
            cells: &self.cells[s * per..(s + 1) * per],
            first: s * per,
        }
    }

    /// Stripe number `s` without its lock: only for the postmaster, when no backend runs.
    pub fn stripe_at_unlocked(&self, s: usize) -> Stripe<'_> {
        let per = self.per_stripe();
        Stripe {
            _guard: None,
            cells: &self.cells[s * per..(s + 1) * per],
            first: s * per,
        }
    }

    /// Locks stripe number `s` (for scans).
    pub fn stripe_at(&self, s: usize) -> Stripe<'_> {
        let per = self.per_stripe();
        Stripe {
            _guard: Some(self.locks[s].exclusive()),
            cells: &self.cells[s * per..(s + 1) * per],
            first: s * per,
        }
    }
}

/// A locked stripe.
pub struct Stripe<'a> {
    _guard: Option<LockGuard<'a>>,
    cells: &'a [MemberCell],
    first: usize,
}

impl<'a> Stripe<'a> {
    pub fn len(&self) -> usize {
        self.cells.len()
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

    /// Finds the current entry of a user.
    pub fn find(&self, sh: &Shared, hash: u64, pool_slot: u32) -> Option<usize> {
        let gen = sh.pool(pool_slot).members_gen.load(Ordering::Acquire);
        let n = self.cells.len();
        let home = self.home(hash);
        for step in 0..n {
            let i = (home + step) % n;
            let m = self.at(i);
            if m.hash == 0 {
                return None;
            }
            if m.hash == hash && m.pool_slot == pool_slot && m.pool_gen == gen {
                return Some(i);
            }
        }
        None
    }

    /// Finds the entry of a member, or makes one (with nothing used yet), taking over a guest's
    /// entry when the stripe has no free one; raises 53400 when the stripe holds only members.
    pub fn find_or_insert_member(&self, sh: &Shared, hash: u64, pool_slot: u32, today: i32) -> usize {
        self.try_insert_member(sh, hash, pool_slot, today).unwrap_or_else(|| {
            let n = self.cells.len();
            errors::error(
                Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "too many pool members for pg_keypool's shared memory",
            )
            .detail(format!(
                "A stripe of {n} entries is full of members (pg_keypool.max_members = {}).",
                n * STRIPES
            ))
            .hint("Raise pg_keypool.max_members in postgresql.conf and restart the server.")
            .raise()
        })
    }

    /// Finds the entry of a member, or makes one; `None` when every entry of the stripe holds
    /// a member.
    pub fn try_insert_member(&self, sh: &Shared, hash: u64, pool_slot: u32, today: i32) -> Option<usize> {
        if let Some(i) = self.find(sh, hash, pool_slot) {
            return Some(i);
        }
        let i = self.free_cell(sh, hash, today).or_else(|| self.evict_guest(sh, hash))?;
        self.init(sh, i, hash, pool_slot);
        Some(i)
    }

    /// Finds the entry of a guest, or makes one while the stripe keeps room for members
    /// (a quarter of it free); `None` otherwise: the guest cannot be tracked one by one.
    pub fn find_or_insert_guest(&self, sh: &Shared, hash: u64, pool_slot: u32, today: i32) -> Option<usize> {
        if let Some(i) = self.find(sh, hash, pool_slot) {
            return Some(i);
        }
        if !self.guest_room(sh, today) {
            return None;
        }
        let i = self.free_cell(sh, hash, today)?;
        self.init(sh, i, hash, pool_slot);
        Some(i)
    }

    /// Entries holding members and live guests.
    pub fn counts(&self, sh: &Shared, today: i32) -> (usize, usize) {
        let (mut members, mut guests) = (0, 0);
        for i in 0..self.cells.len() {
            let m = self.at(i);
            if m.hash == 0 || is_stale(sh, m, today) {
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

    /// Whether a guest may take an entry: more than a quarter of the stripe is free.
    pub fn guest_room(&self, sh: &Shared, today: i32) -> bool {
        let reserve = (self.cells.len() / 4).max(1);
        let mut free = 0;
        for i in 0..self.cells.len() {
            let m = self.at(i);
            if m.hash == 0 || is_stale(sh, m, today) {
                free += 1;
                if free > reserve {
                    return true;
                }
            }
        }
        false
    }

    /// The first free (or stale) entry from the home position of `hash`.
    fn free_cell(&self, sh: &Shared, hash: u64, today: i32) -> Option<usize> {
        let n = self.cells.len();
        let home = self.home(hash);
        (0..n).map(|step| (home + step) % n).find(|&i| {
            let m = self.at(i);
            m.hash == 0 || is_stale(sh, m, today)
        })
    }

    /// Takes over the entry of a guest nearest to the home position of `hash`: what the guest
    /// used today moves to its pool's shared guest allowance, so that it still counts.
    fn evict_guest(&self, sh: &Shared, hash: u64) -> Option<usize> {
        let n = self.cells.len();
        let home = self.home(hash);
        let i = (0..n)
            .map(|step| (home + step) % n)
            .find(|&i| !self.at(i).is_member())?;
        let m = self.at(i);
        if (m.pool_slot as usize) < sh.pools.len() && m.day != NEVER && m.used > 0 {
            sh.pool(m.pool_slot).guests_add(m.day, m.used);
        }
        sh.header.guests_evicted.fetch_add(1, Ordering::Relaxed);
        Some(i)
    }

    fn init(&self, sh: &Shared, i: usize, hash: u64, pool_slot: u32) {
        let gen = sh.pool(pool_slot).members_gen.load(Ordering::Acquire);
        *self.at(i) = Member {
            hash,
            pool_slot,
            pool_gen: gen,
            key_id: 0,
            class: 0,
            flags: 0,
            last_active: NEVER,
            day: NEVER,
            spent_from: 0,
            used: 0,
            share: 0,
            spent: 0,
        };
    }
}

/// An entry that holds nothing worth keeping.
fn is_stale(sh: &Shared, m: &Member, today: i32) -> bool {
    if (m.pool_slot as usize) >= sh.pools.len()
        || sh.pool(m.pool_slot).members_gen.load(Ordering::Acquire) != m.pool_gen
    {
        return true;
    }
    let spending = m.spent > 0 && m.spent_from >= today.saturating_sub(SPEND_KEPT_DAYS);
    !m.is_member() && !spending && (m.day == NEVER || m.day < today.saturating_sub(1))
}

/// First reservation of the day: the member counts as active today and gets today's share.
pub fn activate(shares: &mut PoolShares, policy: &Policy, m: &mut Member, today: i32) -> u64 {
    let weight = if m.is_member() {
        shares.touch(m.class, m.last_active, today);
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
