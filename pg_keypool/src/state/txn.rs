//! Shared-memory changes that follow the transaction that made them.
//!
//! Assigning a user changes shared memory at once (so that concurrent signups see each other's
//! choice and the spread stays exact), and the table row in the same transaction. If the
//! transaction, or the savepoint the change was made in, rolls back, the shared-memory change
//! must be rolled back too: [`on_abort`] records how.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;
use pgrx::prelude::*;

struct Undo {
    subxact: pg_sys::SubTransactionId,
    /// The pool whose members the change is about, if any.
    pool_slot: Option<u32>,
    action: Box<dyn FnOnce()>,
}

type AtEnd = Box<dyn FnOnce(bool)>;

thread_local! {
    static LOG: RefCell<Vec<Undo>> = const { RefCell::new(Vec::new()) };
    static AT_END: RefCell<Vec<AtEnd>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f(committed)` when the top-level transaction ends: after it commits (its changes are
/// then visible to others), or after it aborted or was prepared (and its undos ran).
pub fn at_end(f: impl FnOnce(bool) + 'static) {
    register();
    AT_END.with_borrow_mut(|v| v.push(Box::new(f)));
}

fn run_at_end(committed: bool) {
    let all: Vec<AtEnd> = AT_END.with_borrow_mut(std::mem::take);
    for f in all {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(committed)));
    }
}

/// Runs `undo` if the current (sub)transaction aborts.
pub fn on_abort(undo: impl FnOnce() + 'static) {
    record(None, undo);
}

/// Runs `undo` if the current (sub)transaction aborts, or when it is prepared for two-phase
/// commit: its outcome is then decided later, by `COMMIT PREPARED` or `ROLLBACK PREPARED` in
/// any session, where no callback of ours runs. So shared memory goes back to what is
/// committed, and the pool's members are loaded again from the table once no prepared
/// transaction is left (`after_prepared`, assign.rs).
pub fn on_abort_or_prepare(pool_slot: u32, undo: impl FnOnce() + 'static) {
    record(Some(pool_slot), undo);
}

fn register() {
    if !REGISTERED.replace(true) {
        unsafe {
            pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        }
    }
}

fn record(pool_slot: Option<u32>, undo: impl FnOnce() + 'static) {
    register();
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    LOG.with_borrow_mut(|log| {
        log.push(Undo {
            subxact,
            pool_slot,
            action: Box::new(undo),
        })
    });
}

/// Runs the recorded undos of subtransactions `>= from`, newest first.
fn run_from(from: pg_sys::SubTransactionId) {
    let undos: Vec<Undo> = LOG.with_borrow_mut(|log| {
        let keep = log.iter().position(|u| u.subxact >= from).unwrap_or(log.len());
        log.split_off(keep)
    });
    for undo in undos.into_iter().rev() {
        // An undo only takes locks and writes shared memory; never let a panic escape into the
        // abort path.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(undo.action));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            LOG.with_borrow_mut(|log| log.clear());
            run_at_end(true);
        }
        XACT_EVENT_PREPARE => {
            let pools: Vec<u32> = LOG.with_borrow(|log| log.iter().filter_map(|u| u.pool_slot).collect());
            run_from(0);
            if let Some(sh) = crate::state::shmem::try_shared() {
                for p in pools {
                    if (p as usize) < sh.pools.len() {
                        sh.pool(p).after_prepared.store(1, std::sync::atomic::Ordering::Release);
                    }
                }
            }
            run_at_end(false);
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            run_from(0);
            run_at_end(false);
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_ABORT_SUB => run_from(my_subid),
        SUBXACT_EVENT_COMMIT_SUB => LOG.with_borrow_mut(|log| {
            for u in log.iter_mut().filter(|u| u.subxact == my_subid) {
                u.subxact = parent_subid;
            }
        }),
        _ => {}
    }
}
