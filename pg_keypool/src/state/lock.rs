//! A PostgreSQL LWLock that lives in pg_keypool's shared memory, and its guard.

use std::cell::UnsafeCell;

use pgrx::pg_sys;

/// A PostgreSQL LWLock living in our region.
#[repr(C)]
pub struct Lock(UnsafeCell<pg_sys::LWLock>);

impl Lock {
    pub(in crate::state) unsafe fn init(&self, tranche: i32) {
        unsafe { pg_sys::LWLockInitialize(self.0.get(), tranche) };
    }

    pub fn exclusive(&self) -> LockGuard<'_> {
        unsafe { pg_sys::LWLockAcquire(self.0.get(), pg_sys::LWLockMode::LW_EXCLUSIVE) };
        LockGuard(self)
    }
}

/// Releases the lock when dropped, including while an ERROR unwinds.
pub struct LockGuard<'a>(&'a Lock);

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.0 .0.get()) };
    }
}
