//! The slots of the shared-memory region (shmem.rs lays them out): the header, a slot per scope,
//! key and pool bound to a row by its [`Tag`], open reservations, and the cells of the pools'
//! key trees. A scope slot's rate windows and a pool's shares are guarded by the slot's own
//! lock; everything else is atomics.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::policy::shares::PoolShares;
use crate::policy::window::{MinuteLog, ScopeWindows};
use crate::state::lock::{Lock, LockGuard};
use crate::state::open_count::OpenCount;
use crate::state::provider_hold::ProviderHold;

/// Databases that may have their own settable clock at once (tests).
pub const MAX_CLOCKS: usize = 64;

/// Who a slot belongs to: a database and the extension instance created in it (a new id each
/// time the extension is created, so a dropped and recreated extension never inherits state).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Owner {
    pub dboid: u32,
    pub instance: i64,
}

/// Binds a slot to one row (`id`) of one owner. `id == 0` means the slot is free.
#[repr(C)]
#[derive(Default)]
pub struct Tag {
    dboid: AtomicU32,
    instance: AtomicI64,
    id: AtomicI64,
    /// Wall-clock ms when a backend last bound or confirmed this slot (registry.rs).
    confirmed_ms: AtomicI64,
    /// 1 when the row is (of) a user's own key: such slots may take only a share of the array.
    owned: AtomicU32,
}

impl Tag {
    pub fn id(&self) -> i64 {
        self.id.load(Ordering::Acquire)
    }

    pub fn owner(&self) -> Owner {
        Owner {
            dboid: self.dboid.load(Ordering::Relaxed),
            instance: self.instance.load(Ordering::Relaxed),
        }
    }

    pub fn is(&self, owner: Owner, id: i64) -> bool {
        self.id() == id && self.owner() == owner
    }

    pub fn is_free(&self) -> bool {
        self.id() == 0
    }

    pub(crate) fn set(&self, owner: Owner, id: i64, now_wall_ms: i64) {
        self.owned.store(0, Ordering::Relaxed);
        self.dboid.store(owner.dboid, Ordering::Relaxed);
        self.instance.store(owner.instance, Ordering::Relaxed);
        self.confirmed_ms.store(now_wall_ms, Ordering::Relaxed);
        self.id.store(id, Ordering::Release);
    }

    /// Notes that a backend's configuration still wants this slot's row.
    pub(crate) fn confirm(&self, now_wall_ms: i64) {
        self.confirmed_ms.store(now_wall_ms, Ordering::Relaxed);
    }

    /// Whether the slot's row belongs to a user's own key (set by the registry when it binds or
    /// confirms the slot).
    pub(crate) fn is_owned(&self) -> bool {
        self.owned.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn mark_owned(&self, owned: bool) {
        self.owned.store(owned as u32, Ordering::Relaxed);
    }

    /// Wall-clock ms of the last bind or confirmation.
    pub(crate) fn confirmed_ms(&self) -> i64 {
        self.confirmed_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn clear(&self) {
        self.id.store(0, Ordering::Release);
    }
}

/// Why a scope is cooling down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CoolingReason {
    None = 0,
    RateLimited = 1,
    DailyQuota = 2,
}

impl CoolingReason {
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => CoolingReason::RateLimited,
            2 => CoolingReason::DailyQuota,
            _ => CoolingReason::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CoolingReason::None => "",
            CoolingReason::RateLimited => "rate limited by the provider",
            CoolingReason::DailyQuota => "daily quota used up at the provider",
        }
    }
}

/// Live state of one quota scope.
#[repr(C)]
pub struct ScopeSlot {
    pub(in crate::state) lock: Lock,
    pub tag: Tag,
    pub cooling_until_ms: AtomicI64,
    pub cooling_reason: AtomicU32,
    /// The `Header::stale_epoch` this scope last caught up with (failover.rs).
    pub caught_up_epoch: AtomicU32,
    /// What the provider reported of its room, when less than the windows count.
    pub provider: ProviderHold,
    windows: UnsafeCell<ScopeWindows>,
}

impl ScopeSlot {
    /// Locks the scope's windows.
    pub fn lock(&self) -> ScopeGuard<'_> {
        let guard = self.lock.exclusive();
        ScopeGuard {
            _guard: guard,
            slot: self,
        }
    }

    /// Cools the scope until `until_ms`; a cooldown only ever extends.
    pub fn cool_until(&self, until_ms: i64, reason: CoolingReason) {
        let before = self.cooling_until_ms.fetch_max(until_ms, Ordering::AcqRel);
        if until_ms > before {
            self.cooling_reason.store(reason as u32, Ordering::Release);
        }
    }

    pub fn cooling(&self, now_ms: i64) -> Option<(i64, CoolingReason)> {
        let until = self.cooling_until_ms.load(Ordering::Acquire);
        (until > now_ms).then(|| {
            (
                until,
                CoolingReason::from_u32(self.cooling_reason.load(Ordering::Acquire)),
            )
        })
    }

    /// The windows without the lock. Only for the postmaster, when no backend runs.
    pub(crate) fn windows_unlocked(&self) -> *mut ScopeWindows {
        self.windows.get()
    }
}

pub struct ScopeGuard<'a> {
    _guard: LockGuard<'a>,
    slot: &'a ScopeSlot,
}

impl Deref for ScopeGuard<'_> {
    type Target = ScopeWindows;
    fn deref(&self) -> &ScopeWindows {
        unsafe { &*self.slot.windows.get() }
    }
}

impl DerefMut for ScopeGuard<'_> {
    fn deref_mut(&mut self) -> &mut ScopeWindows {
        unsafe { &mut *self.slot.windows.get() }
    }
}

impl ScopeGuard<'_> {
    pub fn tag(&self) -> &Tag {
        &self.slot.tag
    }
}

/// Usage counters a key accumulates until they are flushed to the hourly history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    Requests = 0,
    Released,
    PromptTokens,
    CompletionTokens,
    Success,
    RateLimited,
    DailyQuota,
    KeyInvalid,
    Billing,
    ServerError,
    CallerError,
    Other,
}

pub const COUNTERS: usize = 12;

/// Live state of one key: its circuit breaker and unflushed usage.
#[repr(C)]
#[derive(Default)]
pub struct KeySlot {
    pub tag: Tag,
    pub consecutive_failures: AtomicU32,
    /// 0: closed. Otherwise the breaker is open until then, and half-open after.
    pub breaker_open_until_ms: AtomicI64,
    /// When the half-open trial request was let through (0: none in flight).
    pub trial_since_ms: AtomicI64,
    pub last_used_ms: AtomicI64,
    pub counters: [AtomicI64; COUNTERS],
    /// Users assigned to the key (members of its pool); guarded by the pool slot's lock.
    pub assigned: AtomicI64,
    /// The key's leaf in its pool's assignment tree, valid while `tree_build` matches the
    /// pool's current build (engine/key_tree.rs).
    pub tree_pos: AtomicU32,
    pub tree_build: AtomicU64,
    /// Its reservations open right now, when the key has a `max_concurrent`; changed under
    /// its scope's lock.
    pub open: OpenCount,
}

impl KeySlot {
    pub fn add(&self, counter: Counter, n: i64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn has_pending(&self) -> bool {
        self.counters.iter().any(|c| c.load(Ordering::Relaxed) != 0)
    }
}

/// A pool's members are not in shared memory yet (after a start, or a new binding).
pub const MEMBERS_UNLOADED: u32 = 0;
/// A backend is loading them.
pub const MEMBERS_LOADING: u32 = 1;
pub const MEMBERS_READY: u32 = 2;

/// Live state of one pool: where its round-robin continues, and its members' aggregates.
#[repr(C)]
pub struct PoolSlot {
    pub tag: Tag,
    pub cursor: AtomicU64,
    pub(in crate::state) lock: Lock,
    pub members_state: AtomicU32,
    pub loader_pid: AtomicI32,
    /// Bumped whenever the members are reloaded or the slot re-bound: member entries of an older
    /// generation are stale.
    pub members_gen: AtomicU32,
    /// A prepared transaction changed the members (txn.rs): load them again from the table once
    /// no prepared transaction is left.
    pub after_prepared: AtomicU32,
    /// The aggregates were restored from a clean shutdown's state file (persist.rs): loading the
    /// pool needs no count of its members.
    pub aggregates_restored: AtomicU32,
    /// Guests that cannot be tracked one by one share one allowance a day: the day (high 32
    /// bits) and the requests they took (low 32 bits), changed with compare-and-swap.
    guests: AtomicU64,
    pub(in crate::state) shares: UnsafeCell<PoolShares>,
    /// Requests this pool refused that a pool of its fallback chain then served, today.
    pub fell_through: DayCount,
    /// What the pool spent of its budget in the current period (budgets.rs).
    pub spend: Spend,
    /// Its callers asking now (callers.rs), for fair shares of the minute.
    pub active: ActiveCallers,
    /// What its users' counted requests took of the last minute, in pools that limit users'
    /// minutes (engine/minute.rs).
    pub minute: PoolMinute,
}

/// A caller counts as active (asking) this long after they last asked.
pub const ACTIVE_MS: i64 = 10_000;
/// Buckets of a pool's count of active callers: one per second, and one more.
const ACTIVE_BUCKETS: usize = (ACTIVE_MS / 1000) as usize + 1;

/// A pool's callers who asked in the last [`ACTIVE_MS`] (callers.rs), by their weights: bucket
/// `s % ACTIVE_BUCKETS` sums the weights of the callers whose latest ask was in second `s`
/// (packed as second << 32 | sum), moved along as each asks again.
#[repr(C)]
pub struct ActiveCallers {
    buckets: [AtomicU64; ACTIVE_BUCKETS],
}

impl Default for ActiveCallers {
    fn default() -> Self {
        ActiveCallers {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn pack(second: u64, count: u64) -> u64 {
    (second << 32) | (count & 0xffff_ffff)
}

impl ActiveCallers {
    /// A caller of `weight` whose previous ask was at `before_ms` (0: not in memory) asks at
    /// `now_ms`.
    pub fn asked(&self, before_ms: i64, now_ms: i64, weight: u32) {
        let now_s = (now_ms.max(0) / 1000) as u64;
        let w = i64::from(weight.max(1));
        let before_s = (before_ms.max(0) / 1000) as u64;
        // Still counted where `weight()` looks (the same whole seconds): moved, not added.
        if before_ms > 0 && before_s + (ACTIVE_MS / 1000) as u64 >= now_s {
            if before_s == now_s {
                return;
            }
            self.change(before_s, -w);
        }
        self.change(now_s, w);
    }

    fn change(&self, second: u64, delta: i64) {
        let b = &self.buckets[(second % ACTIVE_BUCKETS as u64) as usize];
        let mut current = b.load(Ordering::Acquire);
        loop {
            let (s, n) = (current >> 32, current & 0xffff_ffff);
            let next = if s == second {
                pack(second, (n as i64 + delta).max(0) as u64)
            } else if delta > 0 {
                // The bucket held an older second, out of the window.
                pack(second, delta as u64)
            } else {
                // The second it counted is gone already.
                return;
            };
            match b.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// The weights of the callers who asked in the last [`ACTIVE_MS`].
    pub fn weight(&self, now_ms: i64) -> u64 {
        let now_s = (now_ms.max(0) / 1000) as u64;
        let oldest = now_s.saturating_sub((ACTIVE_MS / 1000) as u64);
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .filter(|v| (v >> 32) >= oldest && (v >> 32) <= now_s)
            .map(|v| v & 0xffff_ffff)
            .sum()
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Release);
        }
    }
}

/// A pool's requests and tokens of the last minute, counted with its users' minutes. A spin
/// lock guards it: the critical sections are a few instructions.
#[repr(C)]
pub struct PoolMinute {
    lock: AtomicU32,
    log: UnsafeCell<MinuteLog>,
}

// SAFETY: the log is only touched under the spin lock.
unsafe impl Sync for PoolMinute {}

impl PoolMinute {
    /// Runs `f` on the log under the lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut MinuteLog) -> R) -> R {
        spin_lock(&self.lock);
        let _unlock = SpinUnlock(&self.lock);
        // SAFETY: the lock is held.
        unsafe { f(&mut *self.log.get()) }
    }

    pub fn reset(&self) {
        self.with(|log| *log = MinuteLog::default());
    }
}

fn spin_lock(lock: &AtomicU32) {
    let mut spins = 0u32;
    while lock
        .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

struct SpinUnlock<'a>(&'a AtomicU32);

impl Drop for SpinUnlock<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// A pool's spend in one budget period, in millionths: settled costs plus the estimates that
/// open reservations hold. A spin lock guards it: the critical sections are a few instructions.
#[repr(C)]
pub struct Spend {
    pub(in crate::state) lock: AtomicU32,
    /// The day number the period began on (0: none yet).
    period: UnsafeCell<i32>,
    spent: UnsafeCell<u64>,
}

// SAFETY: the cells are only touched under the spin lock.
unsafe impl Sync for Spend {}

impl Spend {
    /// Runs `f` on (period start, spent) under the lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut i32, &mut u64) -> R) -> R {
        spin_lock(&self.lock);
        let _unlock = SpinUnlock(&self.lock);
        // SAFETY: the lock is held.
        unsafe { f(&mut *self.period.get(), &mut *self.spent.get()) }
    }

    /// The spend of the period that began on `period` (0 when another period is recorded).
    pub fn of(&self, period: i32) -> u64 {
        self.with(|p, spent| if *p == period { *spent } else { 0 })
    }

    pub fn reset(&self) {
        self.with(|p, spent| {
            *p = 0;
            *spent = 0;
        });
    }
}

/// A count of one day (the pool's day number), starting over when the day changes.
#[repr(transparent)]
pub struct DayCount(AtomicU64);

impl DayCount {
    /// Counts one on `day`.
    pub fn add(&self, day: i32) {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            let (d, n) = unpack_guests(current);
            let next = match d.cmp(&day) {
                std::cmp::Ordering::Equal => pack_guests(d, n + 1),
                std::cmp::Ordering::Less => pack_guests(day, 1),
                std::cmp::Ordering::Greater => return,
            };
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// The count of `day`.
    pub fn on(&self, day: i32) -> u64 {
        match unpack_guests(self.0.load(Ordering::Acquire)) {
            (d, n) if d == day => n,
            _ => 0,
        }
    }

    pub fn reset(&self) {
        self.0.store(0, Ordering::Release);
    }
}

fn pack_guests(day: i32, used: u64) -> u64 {
    ((day as u32 as u64) << 32) | used.min(u32::MAX as u64)
}

fn unpack_guests(v: u64) -> (i32, u64) {
    ((v >> 32) as u32 as i32, v & u32::MAX as u64)
}

impl PoolSlot {
    /// What the untracked guests used on `day`.
    pub fn guests_used(&self, day: i32) -> u64 {
        match unpack_guests(self.guests.load(Ordering::Acquire)) {
            (d, used) if d == day => used,
            _ => 0,
        }
    }

    fn guests_update(&self, f: impl Fn(i32, u64) -> Option<(i32, u64)>) -> Option<u64> {
        let mut current = self.guests.load(Ordering::Acquire);
        loop {
            let (d, used) = unpack_guests(current);
            let (nd, nu) = f(d, used)?;
            match self
                .guests
                .compare_exchange_weak(current, pack_guests(nd, nu), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(nu),
                Err(seen) => current = seen,
            }
        }
    }

    /// Takes one request of the shared guest allowance of `day` (`allowance` a day); the use
    /// after taking it, or `None` when it is used up.
    pub fn guests_take(&self, day: i32, allowance: u64) -> Option<u64> {
        self.guests_update(|d, used| {
            let used = if d == day { used } else { 0 };
            (used < allowance).then_some((day, used + 1))
        })
    }

    /// Gives back one request taken on `day`.
    pub fn guests_give_back(&self, day: i32) {
        self.guests_update(|d, used| (d == day && used > 0).then_some((d, used - 1)));
    }

    /// Adds what a guest used on `day` (its entry was taken over by a member).
    pub fn guests_add(&self, day: i32, n: u64) {
        self.guests_update(|d, used| match d.cmp(&day) {
            std::cmp::Ordering::Equal => Some((d, used.saturating_add(n))),
            std::cmp::Ordering::Less => Some((day, n)),
            std::cmp::Ordering::Greater => None,
        });
    }

    /// Starts the shared guest allowance over (keypool_reset_usage).
    pub fn guests_reset(&self) {
        self.guests.store(0, Ordering::Release);
    }

    /// The aggregates without the lock: only for the postmaster, when no backend runs.
    ///
    /// # Safety
    /// No other process may use the slot meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn shares_unlocked(&self) -> &mut PoolShares {
        unsafe { &mut *self.shares.get() }
    }

    /// Locks the pool's aggregates (and its assignment tree). Lock order: pool, then member
    /// stripe, then scope.
    pub fn lock(&self) -> PoolGuard<'_> {
        let guard = self.lock.exclusive();
        PoolGuard {
            _guard: guard,
            slot: self,
        }
    }
}

pub struct PoolGuard<'a> {
    _guard: LockGuard<'a>,
    slot: &'a PoolSlot,
}

impl Deref for PoolGuard<'_> {
    type Target = PoolShares;
    fn deref(&self) -> &PoolShares {
        unsafe { &*self.slot.shares.get() }
    }
}

impl DerefMut for PoolGuard<'_> {
    fn deref_mut(&mut self) -> &mut PoolShares {
        unsafe { &mut *self.slot.shares.get() }
    }
}

/// One cell of the arena that holds the pools' assignment trees.
#[repr(transparent)]
pub struct TreeCell(pub UnsafeCell<u64>);

/// One open reservation (see `reservation.rs`).
#[repr(C)]
#[derive(Default)]
pub struct ReservationSlot {
    pub id: AtomicU64,
    pub closed_id: AtomicU64,
    pub closed_how: AtomicU32,
    pub dboid: AtomicU32,
    pub scope_slot: AtomicU32,
    pub key_slot: AtomicU32,
    pub scope_id: AtomicI64,
    pub key_id: AtomicI64,
    pub at_ms: AtomicI64,
    pub day_start_ms: AtomicI64,
    pub est_tokens: AtomicI64,
    pub flags: AtomicU32,
    pub pool_slot: AtomicU32,
    /// The member entry whose share the request counts against (u32::MAX: none).
    pub member_index: AtomicU32,
    pub member_hash: AtomicU64,
    pub member_day: AtomicI32,
    /// The role that reserved.
    pub role: AtomicU32,
    /// The cost held of the pool's budget (budgets.rs), its period, and the user's entry.
    pub cost_held: AtomicU64,
    pub spend_period: AtomicI32,
    pub spend_index: AtomicU32,
    pub spend_hash: AtomicU64,
    /// The caller entry its grant was counted in (callers.rs; u32::MAX: none), its hash, and
    /// when it was counted there.
    pub caller_index: AtomicU32,
    pub caller_hash: AtomicU64,
    pub caller_at_ms: AtomicI64,
    /// The same for its API token's entry.
    pub token_index: AtomicU32,
    pub token_hash: AtomicU64,
    pub token_at_ms: AtomicI64,
}

/// A database's settable clock (tests).
#[repr(C)]
#[derive(Default)]
pub struct ClockOverride {
    pub dboid: AtomicU32,
    pub now_ms: AtomicI64,
}

#[repr(C)]
pub struct Header {
    pub magic: u64,
    pub scope_capacity: u32,
    pub key_capacity: u32,
    pub pool_capacity: u32,
    pub reservation_capacity: u32,
    pub tranche: i32,
    /// Guards slot allocation (registry.rs).
    pub registry: Lock,
    /// Bumped when any pool, key or scope row changes; backends reload their config cache.
    pub config_generation: AtomicU64,
    pub next_reservation: AtomicU64,
    /// The first reservation id of this server run.
    pub first_reservation: AtomicU64,
    pub reservations_evicted: AtomicU64,
    /// Grants in pools with limits per user and minute made without a caller entry (every
    /// entry of the user's window was live): only the keys' limits held for them.
    pub callers_untracked: AtomicU64,
    /// Bumped when an API token is created, changed or revoked (catalog/api_tokens.rs).
    pub tokens_generation: AtomicU64,
    pub clocks_in_use: AtomicU32,
    pub clocks: [ClockOverride; MAX_CLOCKS],
    /// Process flushing usage history right now (0: none), and since when.
    pub flush_holder: AtomicI32,
    pub flush_since_ms: AtomicI64,
    /// When the state file was last written.
    pub state_saved_ms: AtomicI64,
    /// How this run's state began (persist.rs `Origin`).
    pub restored: AtomicU32,
    /// The timeline of the loaded state file (0: none or a file of the previous release).
    pub loaded_timeline: AtomicU32,
    /// Set when this run's state may be stale once recovery ends (a standby, a restored backup,
    /// a state file of another timeline or system): the first process that sees recovery over
    /// starts a catch-up (failover.rs).
    pub stale_pending: AtomicU32,
    /// Bumped by each catch-up; scopes whose `caught_up_epoch` differs must catch up.
    pub stale_epoch: AtomicU32,
    /// When the end of recovery was noticed (0: not in this run).
    pub recovery_ended_ms: AtomicI64,
    pub launcher_pid: AtomicI32,
    /// Next free cell of the tree arena.
    pub arena_next: AtomicU32,
    /// Numbers the builds of assignment trees.
    pub tree_builds: AtomicU64,
    /// Guest entries members took over, and requests granted from pools' shared guest
    /// allowances (keypool_status).
    pub guests_evicted: AtomicU64,
    pub guests_untracked: AtomicU64,
    /// Set when a member found no clean entry to be cached in: the launcher starts a flush now
    /// rather than at the next flush_interval.
    pub flush_wanted: AtomicU32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_slot() -> PoolSlot {
        // A slot as the zeroed region holds it; the guest allowance needs no lock.
        unsafe { std::mem::zeroed() }
    }

    #[test]
    fn the_shared_guest_allowance_never_grants_more_than_it_holds() {
        let p = pool_slot();
        let day = 20_000;
        for used in 1..=3 {
            assert_eq!(p.guests_take(day, 3), Some(used));
        }
        assert_eq!(p.guests_take(day, 3), None);
        assert_eq!(p.guests_used(day), 3);
        // A release gives one back; a new day starts over.
        p.guests_give_back(day);
        assert_eq!(p.guests_take(day, 3), Some(3));
        assert_eq!(p.guests_used(day + 1), 0);
        assert_eq!(p.guests_take(day + 1, 3), Some(1));
        // A give-back for a day that is over changes nothing.
        p.guests_give_back(day);
        assert_eq!(p.guests_used(day + 1), 1);
    }

    #[test]
    fn what_evicted_guests_used_counts_against_the_allowance() {
        let p = pool_slot();
        let day = 20_000;
        p.guests_add(day, 5);
        assert_eq!(p.guests_take(day, 5), None);
        assert_eq!(p.guests_take(day, 7), Some(6));
        // Use of an older day is not carried into today; a newer day replaces an older one.
        p.guests_add(day - 1, 100);
        assert_eq!(p.guests_used(day), 6);
        p.guests_add(day + 1, 2);
        assert_eq!(p.guests_used(day + 1), 2);
        p.guests_reset();
        assert_eq!(p.guests_used(day + 1), 0);
    }

    const T: i64 = 1_700_000_000_000;

    #[test]
    fn an_active_caller_counts_once_while_they_keep_asking_and_leaves_after_a_pause() {
        let a = ActiveCallers::default();
        a.asked(0, T, 1_000);
        assert_eq!(a.weight(T), 1_000);
        a.asked(T, T + 500, 1_000);
        a.asked(T + 500, T + 5_000, 1_000);
        a.asked(T + 5_000, T + 9_000, 1_000);
        assert_eq!(a.weight(T + 9_000), 1_000);
        a.asked(0, T + 9_500, 5_000);
        assert_eq!(a.weight(T + 9_500), 6_000);
        assert_eq!(a.weight(T + 9_500 + ACTIVE_MS + 1_000), 0);
    }

    #[test]
    fn a_caller_back_after_a_pause_counts_once() {
        let a = ActiveCallers::default();
        a.asked(0, T, 1_000);
        a.asked(T, T + 30_000, 1_000);
        assert_eq!(a.weight(T + 30_000), 1_000);
    }
}
