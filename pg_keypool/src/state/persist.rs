//! The state file: rate-window state that survives a restart.
//!
//! `pg_keypool.state` in the data directory holds every bound scope slot (limits, minute log,
//! day counters, cooldown) and key slot (circuit breaker, unflushed usage). The launcher rewrites
//! it every `pg_keypool.state_save_interval`; the postmaster writes it a last time, marked clean,
//! when the server shuts down normally.
//!
//! When shared memory is created, the postmaster reads it back:
//! - clean: everything is restored as it was, usage counters included;
//! - otherwise (a crash, or the machine went down): what happened since the file was written is
//!   unknown, so each scope is assumed to have used its limits in that time
//!   (`ScopeWindows::assume_worst_since`), and usage counters are not restored, because some of
//!   them may already be in the history table.
//!
//! Right after restoring, the file is rewritten as not clean, so that a crash soon after start
//! never restores the older clean state.
//!
//! The clean save also holds what each pool member used of their share today, so that a clean
//! restart changes nothing for users; periodic saves leave it out (it can be large): after a
//! crash members' use comes back from `keypool.member`, as the flusher last wrote it
//! (history.rs, member_load.rs).
//!
//! The file names the system and timeline that wrote it. Only the same system on the same
//! timeline trusts it; a standby, a restored backup or another timeline loads it as after a
//! crash and catches up from the replicated record when recovery ends (failover.rs); another
//! system's file is ignored.

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::policy::shares::PoolShares;
use crate::policy::shares::NEVER;
use crate::policy::window::codec::{get_i32, get_i64, get_u32, get_u64, put_i32, put_i64, put_u32, put_u64};
use crate::policy::window::ScopeWindows;
use crate::state::clock;
use crate::state::members::STRIPES;
use crate::state::shmem::{self, Shared};
use crate::state::slots::{Owner, COUNTERS};

pub const FILE: &str = "pg_keypool.state";
const MAGIC: u64 = 0x5354_4154_454b_5031; // "KPSTATE1"
/// 5: keys' member counts, members' weight classes and pools' aggregates in the clean save (a
/// clean restart counts no pool's members from its table). 4: pools' spend of their budgets,
/// and members' spend in the clean save. 3: the writer's system identifier, timeline and
/// pending catch-up. 2: the previous release.
const VERSION: u32 = 5;
const VERSION_4: u32 = 4;
const VERSION_3: u32 = 3;
const VERSION_2: u32 = 2;

fn path() -> PathBuf {
    let dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(dir.to_string_lossy().into_owned()).join(FILE)
}

/// Whether this server runs for `pg_upgrade` (`-b`): it grants nothing, and a state file it
/// wrote would say "clean and empty" to the upgraded cluster, which must instead apply the usage
/// recorded in the tables it brought (failover.rs).
fn in_binary_upgrade() -> bool {
    // SAFETY: a plain global PostgreSQL sets once at start.
    unsafe { pg_sys::IsBinaryUpgrade }
}

/// How this run's state began (`Header::restored`, keypool_status().started_from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Origin {
    Empty = 0,
    Clean = 1,
    Crash = 2,
    /// A standby, or a restored backup: the file was loaded as after a crash, and recorded usage
    /// is applied when recovery ends.
    Recovery = 3,
    /// A file another system wrote: ignored; recorded usage is applied at first use.
    OtherSystem = 4,
    /// A file of another timeline (a promotion since it was written): loaded as after a crash,
    /// and recorded usage is applied at first use.
    OtherTimeline = 5,
    /// No state file, and no recovery: a new data directory, or tables copied in by pg_upgrade
    /// or a restore from a cluster that has stopped; their recorded usage is applied at start.
    NoFile = 6,
}

impl Origin {
    pub fn from_u32(v: u32) -> Origin {
        match v {
            1 => Origin::Clean,
            2 => Origin::Crash,
            3 => Origin::Recovery,
            4 => Origin::OtherSystem,
            5 => Origin::OtherTimeline,
            6 => Origin::NoFile,
            _ => Origin::Empty,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Origin::Empty => "empty state",
            Origin::NoFile => "no state file (usage recorded in the tables applied)",
            Origin::Clean => "saved state (clean shutdown)",
            Origin::Crash => "saved state (after a crash; unknown usage assumed)",
            Origin::Recovery => {
                "saved state (recovery: unknown usage assumed; replicated usage applied when recovery ends)"
            }
            Origin::OtherSystem => "replicated usage (the state file was written by another system and is ignored)",
            Origin::OtherTimeline => {
                "saved state of another timeline (unknown usage assumed; replicated usage applied)"
            }
        }
    }
}

struct ScopeRecord {
    owner: Owner,
    id: i64,
    cooling_until_ms: i64,
    cooling_reason: u32,
    windows: ScopeWindows,
}

/// A member's use of their share today.
struct MemberRecord {
    owner: Owner,
    pool_id: i64,
    hash: u64,
    key_id: i64,
    last_active: i32,
    day: i32,
    used: u64,
    share: u64,
    spent_from: i32,
    spent: u64,
    /// A member, or a guest kept for what it spent of a per-user budget.
    member: bool,
    /// Its weight class in the pool's aggregates (which the clean save keeps too).
    class: u32,
}

/// A pool's aggregates (shares.rs) at a clean shutdown, as raw bytes of `PoolShares` (a file
/// of a build with another layout is ignored: the pool is counted from its table).
struct AggregateRecord {
    owner: Owner,
    pool_id: i64,
    shares: PoolShares,
}

/// What a pool spent of its budget in a period (budgets.rs).
struct SpendRecord {
    owner: Owner,
    pool_id: i64,
    period: i32,
    spent: u64,
}

struct KeyRecord {
    owner: Owner,
    id: i64,
    consecutive_failures: u32,
    breaker_open_until_ms: i64,
    last_used_ms: i64,
    counters: [i64; COUNTERS],
    /// Members assigned to the key (restored with the aggregates, after a clean shutdown).
    assigned: i64,
}

/// Encodes the bound slots. `lock` says whether scope locks may (must) be taken: yes in a
/// backend or the launcher, no in the postmaster, where no other process runs any more.
/// `checkpoint`: the shutdown checkpoint a clean save follows (0 otherwise); the aggregates are
/// trusted only by a start that finds that same checkpoint in pg_control.
fn encode(sh: &Shared, writer: Writer, clean: bool, lock: bool, now_ms: i64, checkpoint: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    put_u64(&mut out, MAGIC);
    put_u32(&mut out, VERSION);
    put_u32(&mut out, clean as u32);
    put_i64(&mut out, now_ms);
    put_u64(&mut out, writer.system_identifier);
    put_u32(&mut out, writer.timeline);
    put_u32(&mut out, sh.catch_up_pending() as u32);
    let scopes: Vec<_> = sh.scopes.iter().filter(|s| !s.tag.is_free()).collect();
    put_u32(&mut out, scopes.len() as u32);
    for s in scopes {
        let windows = if lock {
            *s.lock()
        } else {
            unsafe { *s.windows_unlocked() }
        };
        let owner = s.tag.owner();
        put_u32(&mut out, owner.dboid);
        put_i64(&mut out, owner.instance);
        put_i64(&mut out, s.tag.id());
        put_i64(&mut out, s.cooling_until_ms.load(Ordering::Acquire));
        put_u32(&mut out, s.cooling_reason.load(Ordering::Acquire));
        windows.encode(&mut out);
    }
    let keys: Vec<_> = sh.keys.iter().filter(|k| !k.tag.is_free()).collect();
    put_u32(&mut out, keys.len() as u32);
    for k in keys {
        let owner = k.tag.owner();
        put_u32(&mut out, owner.dboid);
        put_i64(&mut out, owner.instance);
        put_i64(&mut out, k.tag.id());
        put_u32(&mut out, k.consecutive_failures.load(Ordering::Acquire));
        put_i64(&mut out, k.breaker_open_until_ms.load(Ordering::Acquire));
        put_i64(&mut out, k.last_used_ms.load(Ordering::Acquire));
        for c in &k.counters {
            put_i64(&mut out, c.load(Ordering::Acquire));
        }
        put_i64(&mut out, k.assigned.load(Ordering::Acquire));
    }
    let members = if clean { members_of_today(sh) } else { Vec::new() };
    put_u32(&mut out, members.len() as u32);
    for m in members {
        put_u32(&mut out, m.owner.dboid);
        put_i64(&mut out, m.owner.instance);
        put_i64(&mut out, m.pool_id);
        put_u64(&mut out, m.hash);
        put_i64(&mut out, m.key_id);
        put_i32(&mut out, m.last_active);
        put_i32(&mut out, m.day);
        put_u64(&mut out, m.used);
        put_u64(&mut out, m.share);
        put_i32(&mut out, m.spent_from);
        put_u64(&mut out, m.spent);
        put_u32(&mut out, m.member as u32);
        put_u32(&mut out, m.class);
    }
    // Pools' spend, in every save: a budget's period can be a month.
    let spends: Vec<SpendRecord> = sh
        .pools
        .iter()
        .filter(|p| !p.tag.is_free())
        .filter_map(|p| {
            // A spin lock: free in the postmaster too, where nothing else runs.
            let (period, spent) = p.spend.with(|period, spent| (*period, *spent));
            (period != 0).then(|| SpendRecord {
                owner: p.tag.owner(),
                pool_id: p.tag.id(),
                period,
                spent,
            })
        })
        .collect();
    put_u32(&mut out, spends.len() as u32);
    for s in spends {
        put_u32(&mut out, s.owner.dboid);
        put_i64(&mut out, s.owner.instance);
        put_i64(&mut out, s.pool_id);
        put_i32(&mut out, s.period);
        put_u64(&mut out, s.spent);
    }
    let aggregates = if clean {
        aggregates_of_loaded_pools(sh)
    } else {
        Vec::new()
    };
    put_u32(&mut out, aggregates.len() as u32);
    put_u64(&mut out, checkpoint);
    put_u32(&mut out, std::mem::size_of::<PoolShares>() as u32);
    for a in aggregates {
        put_u32(&mut out, a.owner.dboid);
        put_i64(&mut out, a.owner.instance);
        put_i64(&mut out, a.pool_id);
        // SAFETY: PoolShares is plain old data (repr(C), Copy, no pointers).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&a.shares as *const PoolShares).cast::<u8>(),
                std::mem::size_of::<PoolShares>(),
            )
        };
        out.extend_from_slice(bytes);
    }
    out
}

/// The aggregates of the pools whose members are loaded, or were restored and not used since.
/// Only called when no backend runs.
fn aggregates_of_loaded_pools(sh: &Shared) -> Vec<AggregateRecord> {
    sh.pools
        .iter()
        .filter(|p| {
            !p.tag.is_free()
                && (p.members_state.load(Ordering::Acquire) == crate::state::slots::MEMBERS_READY
                    || p.aggregates_restored.load(Ordering::Acquire) == 1)
                && p.after_prepared.load(Ordering::Acquire) == 0
        })
        .map(|p| {
            // SAFETY: the postmaster, after every backend exited.
            let mut shares = unsafe { *p.shares_unlocked() };
            // The trees live in an arena that starts empty.
            shares.tree = Default::default();
            AggregateRecord {
                owner: p.tag.owner(),
                pool_id: p.tag.id(),
                shares,
            }
        })
        .collect()
}

/// Members of loaded pools that reserved on some day (guests are left out). Only called when
/// no backend runs, so no lock is taken.
fn members_of_today(sh: &Shared) -> Vec<MemberRecord> {
    let mut out = Vec::new();
    for s in 0..STRIPES {
        let stripe = sh.members.stripe_at_unlocked(s);
        for i in 0..stripe.len() {
            let m = stripe.at(i);
            // Members that reserved on some day, and anyone who spent of a budget.
            let spending = m.spent_from != 0 && m.spent > 0;
            if m.hash == 0
                || !(spending || (m.is_member() && m.day != NEVER))
                || (m.pool_slot as usize) >= sh.pools.len()
            {
                continue;
            }
            let pool = sh.pool(m.pool_slot);
            if pool.tag.is_free() || pool.members_gen.load(Ordering::Acquire) != m.pool_gen {
                continue;
            }
            out.push(MemberRecord {
                owner: pool.tag.owner(),
                pool_id: pool.tag.id(),
                hash: m.hash,
                key_id: m.key_id,
                last_active: m.last_active,
                day: m.day,
                used: m.used,
                share: m.share,
                spent_from: m.spent_from,
                spent: m.spent,
                member: m.is_member(),
                class: u32::from(m.class),
            });
        }
    }
    out
}

struct Decoded {
    clean: bool,
    saved_ms: i64,
    /// Who wrote it; `None` for a file of the previous release.
    writer: Option<Writer>,
    /// Recorded usage had not been applied everywhere when it was written.
    pending: bool,
    scopes: Vec<ScopeRecord>,
    keys: Vec<KeyRecord>,
    members: Vec<MemberRecord>,
    spends: Vec<SpendRecord>,
    aggregates: Vec<AggregateRecord>,
    /// The shutdown checkpoint the aggregates were saved after.
    checkpoint: u64,
}

fn decode(mut input: &[u8]) -> Option<Decoded> {
    let i = &mut input;
    if get_u64(i)? != MAGIC {
        return None;
    }
    let version = get_u32(i)?;
    if ![VERSION, VERSION_4, VERSION_3, VERSION_2].contains(&version) {
        return None;
    }
    let clean = get_u32(i)? == 1;
    let saved_ms = get_i64(i)?;
    let (writer, pending) = if version >= VERSION_3 {
        let writer = Writer {
            system_identifier: get_u64(i)?,
            timeline: get_u32(i)?,
        };
        (Some(writer), get_u32(i)? == 1)
    } else {
        (None, false)
    };
    let n = get_u32(i)? as usize;
    let mut scopes = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        scopes.push(ScopeRecord {
            owner: Owner {
                dboid: get_u32(i)?,
                instance: get_i64(i)?,
            },
            id: get_i64(i)?,
            cooling_until_ms: get_i64(i)?,
            cooling_reason: get_u32(i)?,
            windows: ScopeWindows::decode(i)?,
        });
    }
    let n = get_u32(i)? as usize;
    let mut keys = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let mut k = KeyRecord {
            owner: Owner {
                dboid: get_u32(i)?,
                instance: get_i64(i)?,
            },
            id: get_i64(i)?,
            consecutive_failures: get_u32(i)?,
            breaker_open_until_ms: get_i64(i)?,
            last_used_ms: get_i64(i)?,
            counters: [0; COUNTERS],
            assigned: 0,
        };
        for c in k.counters.iter_mut() {
            *c = get_i64(i)?;
        }
        if version >= VERSION {
            k.assigned = get_i64(i)?;
        }
        keys.push(k);
    }
    let n = get_u32(i)? as usize;
    let mut members = Vec::with_capacity(n.min(1 << 22));
    for _ in 0..n {
        members.push(MemberRecord {
            owner: Owner {
                dboid: get_u32(i)?,
                instance: get_i64(i)?,
            },
            pool_id: get_i64(i)?,
            hash: get_u64(i)?,
            key_id: get_i64(i)?,
            last_active: get_i32(i)?,
            day: get_i32(i)?,
            used: get_u64(i)?,
            share: get_u64(i)?,
            spent_from: if version >= VERSION_4 { get_i32(i)? } else { 0 },
            spent: if version >= VERSION_4 { get_u64(i)? } else { 0 },
            member: if version >= VERSION_4 { get_u32(i)? == 1 } else { true },
            class: if version >= VERSION { get_u32(i)? } else { u32::MAX },
        });
    }
    let mut spends = Vec::new();
    if version >= VERSION_4 {
        let n = get_u32(i)? as usize;
        spends.reserve(n.min(1 << 16));
        for _ in 0..n {
            spends.push(SpendRecord {
                owner: Owner {
                    dboid: get_u32(i)?,
                    instance: get_i64(i)?,
                },
                pool_id: get_i64(i)?,
                period: get_i32(i)?,
                spent: get_u64(i)?,
            });
        }
    }
    let mut aggregates = Vec::new();
    let mut checkpoint = 0;
    if version >= VERSION {
        let n = get_u32(i)? as usize;
        checkpoint = get_u64(i)?;
        let size = get_u32(i)? as usize;
        for _ in 0..n {
            let owner = Owner {
                dboid: get_u32(i)?,
                instance: get_i64(i)?,
            };
            let pool_id = get_i64(i)?;
            if i.len() < size {
                return None;
            }
            let (bytes, rest) = i.split_at(size);
            *i = rest;
            if size == std::mem::size_of::<PoolShares>() {
                // SAFETY: as many bytes as a PoolShares, which is plain old data; written by
                // this build (same size) from a valid value.
                let shares = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PoolShares>()) };
                aggregates.push(AggregateRecord { owner, pool_id, shares });
            }
        }
    }
    i.is_empty().then_some(Decoded {
        clean,
        saved_ms,
        writer,
        pending,
        scopes,
        keys,
        members,
        spends,
        aggregates,
        checkpoint,
    })
}

fn write_file(bytes: &[u8]) -> std::io::Result<()> {
    let target = path();
    let tmp = target.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &target)?;
    if let Some(dir) = target.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Which cluster wrote a state file: its system identifier and timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer {
    pub system_identifier: u64,
    pub timeline: u32,
}

/// What `pg_control` says about this data directory.
struct Control {
    writer: Writer,
    /// The last shutdown was clean (not in recovery).
    shut_down_cleanly: bool,
    /// A standby's or an archive recovery's state (shut down in recovery, or in it).
    in_recovery: bool,
    /// The last checkpoint's location.
    checkpoint: u64,
}

/// Reads `pg_control` from disk (the postmaster, at start and at shutdown).
fn read_control() -> Option<Control> {
    unsafe {
        let mut crc_ok = false;
        let c = pg_sys::get_controlfile(pg_sys::DataDir, &mut crc_ok);
        if c.is_null() || !crc_ok {
            return None;
        }
        let c = &*c;
        Some(Control {
            writer: Writer {
                system_identifier: c.system_identifier,
                timeline: c.checkPointCopy.ThisTimeLineID,
            },
            shut_down_cleanly: c.state == pg_sys::DBState::DB_SHUTDOWNED,
            in_recovery: matches!(
                c.state,
                pg_sys::DBState::DB_SHUTDOWNED_IN_RECOVERY | pg_sys::DBState::DB_IN_ARCHIVE_RECOVERY
            ),
            checkpoint: c.checkPoint,
        })
    }
}

/// This server as a writer, from a running process (launcher or backend).
fn this_server() -> Writer {
    unsafe {
        let timeline = if pg_sys::RecoveryInProgress() {
            read_control().map_or(0, |c| c.writer.timeline)
        } else {
            pg_sys::GetWALInsertionTimeLine()
        };
        Writer {
            system_identifier: pg_sys::GetSystemIdentifier(),
            timeline,
        }
    }
}

/// Files whose presence means the server starts a recovery that may end in a promotion: a
/// standby, an archive recovery or a restored base backup.
fn recovery_files_present() -> bool {
    let dir = path();
    let dir = dir.parent().map(PathBuf::from).unwrap_or_default();
    ["standby.signal", "recovery.signal", "backup_label"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// Saves the current state (launcher, or `keypool_save_state()` in a backend).
pub fn save(sh: &Shared) -> std::io::Result<()> {
    if in_binary_upgrade() {
        return Ok(());
    }
    let now = clock::real_now_ms();
    write_file(&encode(sh, this_server(), false, true, now, 0))?;
    sh.header.state_saved_ms.store(now, Ordering::Release);
    Ok(())
}

/// Saves the final state, marked clean. Runs in the postmaster after every backend exited.
pub fn save_at_shutdown() {
    let Some(sh) = shmem::try_shared() else {
        return;
    };
    if in_binary_upgrade() {
        return;
    }
    let Some(control) = read_control() else {
        log!("pg_keypool: could not read pg_control; {FILE} is left as it was");
        return;
    };
    // Pools' aggregates only after a real clean shutdown (every transaction ended, rolling back
    // its shared-memory changes, and a shutdown checkpoint written): an immediate shutdown kills
    // backends in the middle of assignments.
    let checkpoint = if control.shut_down_cleanly {
        control.checkpoint
    } else {
        0
    };
    if let Err(e) = write_file(&encode(
        sh,
        control.writer,
        true,
        false,
        clock::real_now_ms(),
        checkpoint,
    )) {
        log!("pg_keypool: could not save {FILE} at shutdown: {e}");
    }
}

/// How far a state file can be trusted by this server.
fn judge(file: &Decoded, control: &Control, recovering: bool) -> Origin {
    match file.writer {
        Some(w) if w.system_identifier != control.writer.system_identifier => Origin::OtherSystem,
        _ if recovering => Origin::Recovery,
        Some(w) if w.timeline != control.writer.timeline => Origin::OtherTimeline,
        // The previous release's file names no writer: trusted as clean only after a clean
        // shutdown of this very data directory (not a copy taken while it ran).
        None if file.clean && !control.shut_down_cleanly => Origin::Crash,
        _ if file.clean => Origin::Clean,
        _ => Origin::Crash,
    }
}

/// Restores the state into a freshly created region. Runs in the postmaster.
pub fn restore_at_startup() {
    let Some(sh) = shmem::try_shared() else {
        return;
    };
    if in_binary_upgrade() {
        // pg_upgrade's runs of the old and the new server grant nothing: the old cluster's
        // file stays as its last clean shutdown left it, and the new one gets none.
        return;
    }
    let control = read_control();
    let recovering = recovery_files_present() || control.as_ref().is_some_and(|c| c.in_recovery);
    if recovering {
        // Whatever is loaded, the primary may have granted more since: catch up when recovery
        // ends (failover.rs).
        sh.header.stale_pending.store(1, Ordering::Release);
    }
    let bytes = match fs::read(path()) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A new data directory, or one whose tables were copied in (pg_upgrade, a restored
            // dump): what the tables recorded of today is applied when the launcher starts,
            // before this server grants anything (failover.rs). A standby or restored backup
            // without a file catches up as any recovery does.
            sh.header.stale_pending.store(1, Ordering::Release);
            if !recovering {
                sh.header.restored.store(Origin::NoFile as u32, Ordering::Release);
            }
            return;
        }
        Err(e) => {
            warning!("pg_keypool: could not read {FILE}: {e}; rate windows start empty");
            return;
        }
    };
    let Some(state) = decode(&bytes) else {
        warning!("pg_keypool: {FILE} is damaged or from another version; rate windows start empty");
        return;
    };
    let Some(control) = control else {
        warning!("pg_keypool: could not read pg_control; {FILE} is ignored and recorded usage applied at first use");
        sh.header.stale_pending.store(1, Ordering::Release);
        sh.header.restored.store(Origin::OtherSystem as u32, Ordering::Release);
        return;
    };
    let origin = judge(&state, &control, recovering);
    if !matches!(origin, Origin::Clean | Origin::Crash) || state.pending {
        sh.header.stale_pending.store(1, Ordering::Release);
    }
    sh.header.restored.store(origin as u32, Ordering::Release);
    sh.header
        .loaded_timeline
        .store(state.writer.map_or(0, |w| w.timeline), Ordering::Release);
    if origin == Origin::OtherSystem {
        log!(
            "pg_keypool: {FILE} was written by another system (identifier {}, this one is {}); it is ignored",
            state.writer.map_or(0, |w| w.system_identifier),
            control.writer.system_identifier
        );
        return;
    }
    let clean = origin == Origin::Clean;
    let now = clock::real_now_ms();
    let mut restored = 0;
    for (slot, r) in sh.scopes.iter().zip(state.scopes.iter()) {
        let mut windows = r.windows;
        if !clean {
            windows.assume_worst_since(state.saved_ms, now);
        }
        unsafe { *slot.windows_unlocked() = windows };
        slot.cooling_until_ms.store(r.cooling_until_ms, Ordering::Release);
        slot.cooling_reason.store(r.cooling_reason, Ordering::Release);
        slot.tag.set(r.owner, r.id, now);
        restored += 1;
    }
    for (slot, r) in sh.keys.iter().zip(state.keys.iter()) {
        slot.consecutive_failures
            .store(r.consecutive_failures, Ordering::Release);
        slot.breaker_open_until_ms
            .store(r.breaker_open_until_ms, Ordering::Release);
        slot.last_used_ms.store(r.last_used_ms, Ordering::Release);
        if clean {
            for (c, v) in slot.counters.iter().zip(r.counters.iter()) {
                c.store(*v, Ordering::Release);
            }
        }
        slot.tag.set(r.owner, r.id, now);
    }
    if clean {
        // Only if the server did not run since (without the library, say): the shutdown
        // checkpoint the save followed is still the last one.
        if state.checkpoint != 0 && state.checkpoint == control.checkpoint {
            restore_aggregates(sh, &state);
        }
        restore_members(sh, &state.members);
    }
    // Spend comes back after a crash too (what was settled since the save is unknown; the
    // flusher's record in keypool.pool_spend is compared when the pool is loaded).
    for r in &state.spends {
        if let Some(slot) = pool_slot_for(sh, r.owner, r.pool_id) {
            sh.pool(slot).spend.with(|period, spent| {
                *period = r.period;
                *spent = r.spent;
            });
        }
    }
    if state.scopes.len() > sh.scopes.len() || state.keys.len() > sh.keys.len() {
        warning!("pg_keypool: {FILE} holds more scopes or keys than pg_keypool.max_scopes / max_keys allow; the rest start empty");
    }
    sh.header.state_saved_ms.store(now, Ordering::Release);
    log!(
        "pg_keypool: restored {restored} scopes from {FILE}: {}",
        origin.describe()
    );
    if let Err(e) = write_file(&encode(sh, control.writer, false, false, now, 0)) {
        warning!("pg_keypool: could not rewrite {FILE}: {e}");
    }
}

/// Puts pools' aggregates and keys' member counts back (a clean shutdown: the tables cannot
/// have changed since), so that loading those pools counts nothing. A pool whose keys were not
/// all saved is counted from its table as usual.
fn restore_aggregates(sh: &Shared, state: &Decoded) {
    if state.aggregates.is_empty() || state.keys.len() > sh.keys.len() {
        return;
    }
    for (slot, r) in sh.keys.iter().zip(state.keys.iter()) {
        slot.assigned.store(r.assigned, Ordering::Release);
    }
    for a in &state.aggregates {
        if let Some(slot) = pool_slot_for(sh, a.owner, a.pool_id) {
            let p = sh.pool(slot);
            // SAFETY: the postmaster, before any backend exists.
            unsafe { *p.shares_unlocked() = a.shares };
            p.aggregates_restored.store(1, Ordering::Release);
        }
    }
}

/// Puts members' usage of the day back; their pools' slots are bound to them here, and the rest
/// of each pool's members come from its table when it is first used (member_load.rs keeps this usage).
fn restore_members(sh: &Shared, records: &[MemberRecord]) {
    for r in records {
        let Some(slot) = pool_slot_for(sh, r.owner, r.pool_id) else {
            continue;
        };
        let stripe = sh.members.stripe_at_unlocked((r.hash % STRIPES as u64) as usize);
        let entry = if r.member {
            stripe.insert_member(r.hash, slot, r.day, crate::state::members::minute(clock::real_now_ms()))
        } else {
            stripe.find_or_insert_guest(
                r.hash,
                slot,
                r.spent_from.max(r.day),
                crate::state::members::minute(clock::real_now_ms()),
            )
        };
        let Some(i) = entry else {
            continue;
        };
        let m = stripe.at(i);
        m.key_id = r.key_id;
        if r.class != u32::MAX {
            m.class = r.class as u8;
        }
        m.last_active = r.last_active;
        m.day = r.day;
        m.used = r.used;
        m.share = r.share;
        m.spent_from = r.spent_from;
        m.spent = r.spent;
        if r.spent > 0 {
            // keypool.user_spend may be older than the clean save.
            m.flags |= crate::state::members::FLAG_SPEND_DIRTY;
        }
        // A member: kept (not evicted) until its use of the day is written to keypool.member,
        // which may be older than the clean save.
        if r.member {
            m.flags |= crate::state::members::FLAG_MEMBER
                | crate::state::members::FLAG_USE_DIRTY
                | crate::state::members::FLAG_ACTIVE_DIRTY;
        }
    }
}

/// The slot of a pool being restored: the one bound to it already, else a free one bound now.
fn pool_slot_for(sh: &Shared, owner: Owner, pool_id: i64) -> Option<u32> {
    let i = match sh.pools.iter().position(|p| p.tag.is(owner, pool_id)) {
        Some(i) => i,
        None => {
            let i = sh.pools.iter().position(|p| p.tag.is_free())?;
            sh.pools[i].tag.set(owner, pool_id, clock::real_now_ms());
            i
        }
    };
    Some(i as u32)
}

#[cfg(test)]
mod judge_tests {
    use super::*;

    fn file(writer: Option<(u64, u32)>, clean: bool) -> Decoded {
        Decoded {
            clean,
            saved_ms: 0,
            writer: writer.map(|(system_identifier, timeline)| Writer {
                system_identifier,
                timeline,
            }),
            pending: false,
            scopes: Vec::new(),
            keys: Vec::new(),
            members: Vec::new(),
            spends: Vec::new(),
            aggregates: Vec::new(),
            checkpoint: 0,
        }
    }

    fn control(system: u64, timeline: u32, shut_down_cleanly: bool) -> Control {
        Control {
            writer: Writer {
                system_identifier: system,
                timeline,
            },
            shut_down_cleanly,
            in_recovery: false,
            checkpoint: 0,
        }
    }

    #[test]
    fn only_the_writer_on_its_timeline_trusts_a_state_file() {
        let here = control(7, 2, true);
        assert_eq!(judge(&file(Some((7, 2)), true), &here, false), Origin::Clean);
        assert_eq!(judge(&file(Some((7, 2)), false), &here, false), Origin::Crash);
        assert_eq!(judge(&file(Some((8, 2)), true), &here, false), Origin::OtherSystem);
        assert_eq!(judge(&file(Some((7, 1)), true), &here, false), Origin::OtherTimeline);
        // A standby or a restored backup: never trusted as it is, whatever the file says.
        assert_eq!(judge(&file(Some((7, 2)), true), &here, true), Origin::Recovery);
        assert_eq!(judge(&file(Some((8, 2)), true), &here, true), Origin::OtherSystem);
    }

    #[test]
    fn the_previous_release_s_clean_file_is_trusted_after_a_clean_shutdown_only() {
        assert_eq!(judge(&file(None, true), &control(7, 1, true), false), Origin::Clean);
        // A copy taken while the server ran (pg_control says it was running).
        assert_eq!(judge(&file(None, true), &control(7, 1, false), false), Origin::Crash);
        assert_eq!(judge(&file(None, false), &control(7, 1, true), false), Origin::Crash);
        assert_eq!(judge(&file(None, true), &control(7, 1, true), true), Origin::Recovery);
    }
}
