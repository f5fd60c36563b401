//! The shared-memory region: where every backend finds the live state of scopes, keys, pools
//! and open reservations.
//!
//! One region, sized from the `pg_keypool.max_*` settings when the server starts:
//!
//! ```text
//! [Header][ScopeSlot; max_scopes][KeySlot; max_keys][PoolSlot; max_pools][ReservationSlot; max_reservations]
//! [Lock; STRIPES][StripeStats; STRIPES][MemberCell; max_members][TreeCell; 8 * max_keys]
//! [CallerCell; max_callers][OpenCount; max_callers][IndexCell; max_callers][UsedWord; ...]
//! ```
//!
//! Slots are bound to database rows by a [`Tag`] (database, extension instance, row id); see
//! `registry.rs`. A scope slot's rate windows are guarded by the slot's own LWLock; everything
//! else is atomics. The region exists only when the library is in `shared_preload_libraries`;
//! [`shared`] raises a clean ERROR otherwise.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use crate::errors;
use crate::policy::shares::PoolShares;
use crate::settings;
use crate::state::callers::{self, CallerCell, CallerTable, IndexCell, UsedWord};
use crate::state::lock::Lock;
use crate::state::members::{MemberCell, MemberTable, StripeStats, STRIPES};
use crate::state::open_count::OpenCount;
use crate::state::slots::{Header, KeySlot, PoolSlot, ReservationSlot, ScopeSlot, TreeCell};

const MAGIC: u64 = 0x4b45_5950_4f4f_4c01;
/// Index of `AddinShmemInitLock` in `MainLWLockArray` (PostgreSQL 15, lwlocknames.h).
const ADDIN_SHMEM_INIT_LOCK: usize = 21;

/// The whole region, as seen by one process.
pub struct Shared {
    pub header: &'static Header,
    pub scopes: &'static [ScopeSlot],
    pub keys: &'static [KeySlot],
    pub pools: &'static [PoolSlot],
    pub reservations: &'static [ReservationSlot],
    pub members: MemberTable,
    pub tree_cells: &'static [TreeCell],
    pub callers: CallerTable,
}

static mut SHARED: Option<Shared> = None;

/// The region, or a clean ERROR when the library was not preloaded.
pub fn shared() -> &'static Shared {
    match try_shared() {
        Some(s) => s,
        None => errors::not_preloaded().raise(),
    }
}

pub fn try_shared() -> Option<&'static Shared> {
    // SAFETY: written once in the postmaster before any backend exists; read-only afterwards.
    unsafe { (*std::ptr::addr_of!(SHARED)).as_ref() }
}

struct Capacities {
    scopes: usize,
    keys: usize,
    pools: usize,
    reservations: usize,
    members: usize,
    callers: usize,
}

impl Capacities {
    fn from_settings() -> Self {
        Capacities {
            scopes: settings::MAX_SCOPES.get() as usize,
            keys: settings::MAX_KEYS.get() as usize,
            pools: settings::MAX_POOLS.get() as usize,
            reservations: settings::MAX_RESERVATIONS.get() as usize,
            // A whole number of entries per stripe.
            members: (settings::MAX_MEMBERS.get() as usize).div_ceil(STRIPES) * STRIPES,
            callers: (settings::MAX_CALLERS.get() as usize).div_ceil(STRIPES) * STRIPES,
        }
    }

    fn tree_cells(&self) -> usize {
        8 * self.keys
    }

    /// Byte offsets of the parts, and the total size.
    /// Words of the callers' in-use bitmaps.
    fn used_words(&self) -> usize {
        callers::used_words(self.callers / STRIPES) * STRIPES
    }

    fn layout(&self) -> ([usize; 13], usize) {
        fn align(n: usize) -> usize {
            n.div_ceil(64) * 64
        }
        let mut at = 0;
        let mut offsets = [0; 13];
        let sizes = [
            std::mem::size_of::<Header>(),
            std::mem::size_of::<ScopeSlot>() * self.scopes,
            std::mem::size_of::<KeySlot>() * self.keys,
            std::mem::size_of::<PoolSlot>() * self.pools,
            std::mem::size_of::<ReservationSlot>() * self.reservations,
            std::mem::size_of::<Lock>() * STRIPES,
            std::mem::size_of::<StripeStats>() * STRIPES,
            std::mem::size_of::<MemberCell>() * self.members,
            std::mem::size_of::<TreeCell>() * self.tree_cells(),
            std::mem::size_of::<CallerCell>() * self.callers,
            std::mem::size_of::<OpenCount>() * self.callers,
            std::mem::size_of::<IndexCell>() * self.callers,
            std::mem::size_of::<UsedWord>() * self.used_words(),
        ];
        for (i, size) in sizes.iter().enumerate() {
            offsets[i] = at;
            at = align(at + size);
        }
        (offsets, at)
    }
}

/// The size of the region under the current settings (the postmaster requests it at preload).
pub fn size() -> usize {
    Capacities::from_settings().layout().1
}

/// Creates the region, or attaches to the one the postmaster created (an `EXEC_BACKEND`
/// child). Returns true when it was created, zeroed and initialised now. Called from the
/// shmem startup hook (background/startup.rs).
///
/// # Safety
/// Only from the shmem startup hook, which PostgreSQL runs once per process before anything
/// else touches shared memory.
pub unsafe fn attach() -> bool {
    unsafe {
        let caps = Capacities::from_settings();
        let (offsets, size) = caps.layout();
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base = pg_sys::ShmemInitStruct(c"pg_keypool".as_ptr(), size, &mut found) as *mut u8;
        if !found {
            std::ptr::write_bytes(base, 0, size);
        }
        let shared = Shared {
            header: &*(base.add(offsets[0]) as *const Header),
            scopes: std::slice::from_raw_parts(base.add(offsets[1]) as *const ScopeSlot, caps.scopes),
            keys: std::slice::from_raw_parts(base.add(offsets[2]) as *const KeySlot, caps.keys),
            pools: std::slice::from_raw_parts(base.add(offsets[3]) as *const PoolSlot, caps.pools),
            reservations: std::slice::from_raw_parts(base.add(offsets[4]) as *const ReservationSlot, caps.reservations),
            members: MemberTable {
                pools: std::slice::from_raw_parts(base.add(offsets[3]) as *const PoolSlot, caps.pools),
                header: &*(base.add(offsets[0]) as *const Header),
                locks: std::slice::from_raw_parts(base.add(offsets[5]) as *const Lock, STRIPES),
                stats: std::slice::from_raw_parts(base.add(offsets[6]) as *const StripeStats, STRIPES),
                cells: std::slice::from_raw_parts(base.add(offsets[7]) as *const MemberCell, caps.members),
            },
            tree_cells: std::slice::from_raw_parts(base.add(offsets[8]) as *const TreeCell, caps.tree_cells()),
            callers: CallerTable {
                pools: std::slice::from_raw_parts(base.add(offsets[3]) as *const PoolSlot, caps.pools),
                locks: std::slice::from_raw_parts(base.add(offsets[5]) as *const Lock, STRIPES),
                cells: std::slice::from_raw_parts(base.add(offsets[9]) as *const CallerCell, caps.callers),
                opens: std::slice::from_raw_parts(base.add(offsets[10]) as *const OpenCount, caps.callers),
                index: std::slice::from_raw_parts(base.add(offsets[11]) as *const IndexCell, caps.callers),
                used: std::slice::from_raw_parts(base.add(offsets[12]) as *const UsedWord, caps.used_words()),
                untracked: &(*(base.add(offsets[0]) as *const Header)).callers_untracked,
            },
        };
        if !found {
            let header = &mut *(base.add(offsets[0]) as *mut Header);
            header.magic = MAGIC;
            header.scope_capacity = caps.scopes as u32;
            header.key_capacity = caps.keys as u32;
            header.pool_capacity = caps.pools as u32;
            header.reservation_capacity = caps.reservations as u32;
            header.tranche = pg_sys::LWLockNewTrancheId();
            header.registry.init(header.tranche);
            for slot in shared.scopes {
                slot.lock.init(header.tranche);
            }
            for slot in shared.pools {
                slot.lock.init(header.tranche);
                std::ptr::write(slot.shares.get(), PoolShares::default());
            }
            for lock in shared.members.locks {
                lock.init(header.tranche);
            }
            // Reservation ids of this run start above any id a previous run can have issued
            // (fewer than 4096 reservations per millisecond, on average, since the epoch).
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let first = now_ms << 12;
            header.next_reservation.store(first, Ordering::Relaxed);
            header.first_reservation.store(first, Ordering::Relaxed);
        }
        pg_sys::LWLockRelease(init_lock);
        pg_sys::LWLockRegisterTranche(shared.header.tranche, c"pg_keypool".as_ptr());
        SHARED = Some(shared);
        !found
    }
}

impl Shared {
    /// True when some scope may still hold stale windows (saved into the state file, so that a crash
    /// soon after a promotion catches up again).
    pub fn catch_up_pending(&self) -> bool {
        if self.header.stale_pending.load(Ordering::Acquire) != 0 {
            return true;
        }
        let epoch = self.header.stale_epoch.load(Ordering::Acquire);
        epoch != 0
            && self
                .scopes
                .iter()
                .any(|s| !s.tag.is_free() && s.caught_up_epoch.load(Ordering::Acquire) != epoch)
    }

    pub fn scope(&self, slot: u32) -> &'static ScopeSlot {
        &self.scopes[slot as usize]
    }

    pub fn key(&self, slot: u32) -> &'static KeySlot {
        &self.keys[slot as usize]
    }

    pub fn pool(&self, slot: u32) -> &'static PoolSlot {
        &self.pools[slot as usize]
    }

    /// Tells every backend to reload its configuration cache.
    pub fn bump_config_generation(&self) {
        self.header.config_generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn config_generation(&self) -> u64 {
        self.header.config_generation.load(Ordering::Acquire)
    }
}
