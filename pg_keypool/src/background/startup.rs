//! The server's start and stop: the hooks that size and create the shared-memory region
//! (state/shmem.rs), read the state file back into it when it is new, and save it a last time,
//! marked clean, when the postmaster exits normally (state/persist.rs).

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::state::{persist, shmem};

static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// Installs the hooks. Called from `_PG_init` at preload.
pub fn install_hooks() {
    unsafe {
        PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(shmem::size());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP_HOOK {
            prev();
        }
        if shmem::attach() {
            persist::restore_at_startup();
        }
        if !pg_sys::IsUnderPostmaster {
            pg_sys::on_shmem_exit(Some(shmem_exit), pg_sys::Datum::from(0));
        }
    }
}

/// Runs in the postmaster when it exits. On a clean shutdown (code 0) every backend is gone,
/// so the final state is saved as clean; after a crash the periodic save stays as it is.
#[pg_guard]
unsafe extern "C-unwind" fn shmem_exit(code: i32, _arg: pg_sys::Datum) {
    if code == 0 {
        persist::save_at_shutdown();
    }
}
