//! Background work: the launcher saves rate-window state to disk every
//! `pg_keypool.state_save_interval` and, every `pg_keypool.flush_interval`, starts a short-lived
//! flusher in each database with keys (usage history, alerts, event retention). The launcher itself needs no
//! database connection; a flusher connects to its database, writes the hourly history, exits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::background::history;
use crate::catalog::config;
use crate::settings;
use crate::state::clock;
use crate::state::persist;
use crate::state::shmem;

/// Registers the launcher. Called from `_PG_init` at preload.
pub fn register() {
    BackgroundWorkerBuilder::new("pg_keypool launcher")
        .set_type("pg_keypool launcher")
        .set_library("pg_keypool")
        .set_function("pg_keypool_launcher_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_keypool_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let sh = shmem::shared();
    sh.header
        .launcher_pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    let mut last_save = 0i64;
    let mut last_flush = clock::real_now_ms();
    let mut flushers: HashMap<u32, DynamicBackgroundWorker> = HashMap::new();
    let mut save_failed = false;
    // The launcher starts when recovery ends: a promoted standby's state is marked stale now.
    crate::catalog::failover::end_recovery_if_pending(sh);
    loop {
        let save_every = settings::STATE_SAVE_INTERVAL_MS.get() as i64;
        let flush_every = settings::FLUSH_INTERVAL_MS.get() as i64;
        if !BackgroundWorker::wait_latch(Some(
            Duration::from_millis(save_every.min(flush_every).min(1000) as u64),
        )) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let now = clock::real_now_ms();
        if now - last_save >= save_every {
            match persist::save(sh) {
                Ok(()) => save_failed = false,
                Err(e) if !save_failed => {
                    save_failed = true;
                    warning!("pg_keypool: could not save rate-window state: {e}");
                }
                Err(_) => {}
            }
            last_save = now;
        }
        // Members waiting for clean cache entries (members.rs) do not wait for the interval.
        if now - last_flush >= flush_every || sh.header.flush_wanted.swap(0, Ordering::AcqRel) != 0 {
            last_flush = now;
            flushers.retain(|_, w| {
                w.pid().is_ok() || matches!(w.pid(), Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted))
            });
            // Every database with keys: usage to flush, alerts to check, old events to drop.
            let pending: HashSet<u32> = sh
                .keys
                .iter()
                .filter(|k| !k.tag.is_free())
                .map(|k| k.tag.owner().dboid)
                .collect();
            for dboid in pending {
                if flushers.contains_key(&dboid) {
                    continue;
                }
                let started = BackgroundWorkerBuilder::new("pg_keypool flusher")
                    .set_type("pg_keypool flusher")
                    .set_library("pg_keypool")
                    .set_function("pg_keypool_flusher_main")
                    .set_argument(Some(pg_sys::Datum::from(dboid)))
                    .enable_spi_access()
                    .set_restart_time(None)
                    .load_dynamic();
                if let Ok(worker) = started {
                    flushers.insert(dboid, worker);
                }
            }
        }
    }
    // Leave a fresh state file behind; the postmaster writes the final, clean one after every
    // backend has exited.
    let _ = persist::save(sh);
}

/// Writes one database's unflushed usage to its hourly history, checks its alerts and drops
/// events past their retention, then exits.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_keypool_flusher_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let dboid = arg.value() as u32;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(dboid)), None);
    let installed_here = BackgroundWorker::transaction(|| {
        // The flusher runs as a superuser: never through a look-alike the database's settings
        // could put first on its search path.
        let _path = crate::catalog::privilege::pin_search_path();
        let version = Spi::get_one::<String>(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_keypool'",
        );
        match version {
            Ok(Some(v)) if v == crate::catalog::privilege::LIBRARY_VERSION => {
                let cfg = config::current();
                history::flush(&cfg);
                crate::catalog::failover::record(shmem::shared(), &cfg);
                true
            }
            // Installed, but its SQL objects wait for ALTER EXTENSION ... UPDATE: keep the
            // counters for later.
            Ok(Some(_)) => false,
            _ => {
                if let Some(sh) = shmem::try_shared() {
                    // The extension is gone from this database: its counters have nowhere to go.
                    for k in sh.keys.iter().filter(|k| k.tag.owner().dboid == dboid) {
                        for c in &k.counters {
                            c.store(0, Ordering::Release);
                        }
                    }
                }
                false
            }
        }
    });
    // Separately, so that a failure here never holds up the history.
    if installed_here {
        BackgroundWorker::transaction(|| {
            let _path = crate::catalog::privilege::pin_search_path();
            if let Err(e) = Spi::run("SELECT keypool.maintain()") {
                warning!("pg_keypool: background upkeep failed: {e}");
            }
        });
    }
}
