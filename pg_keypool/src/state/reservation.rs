//! Open reservations: a ring in shared memory, claimed and closed with compare-and-swap.
//!
//! Ids increase by one per reservation and start, in each server run, above any id an earlier
//! run could have issued (the start time in milliseconds, shifted left by 12 bits). Id `n`
//! lives in the first usable of the slots `n, n+1, ... n+PROBES-1` (mod the ring size): a slot is
//! usable when it is free, or holds an expired reservation of this database. If none is, the
//! oldest candidate is expired early: its estimate stays charged (the safe side), it is counted,
//! and settling it later says why.
//!
//! A slot's `id` field is the lock: `0` free, [`CLAIMING`] while being written, otherwise the id
//! of the open reservation whose fields it holds. Whoever swaps the id from `n` to `0` owns
//! reservation `n`'s outcome; the fields read before a successful swap are that reservation's.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::state::callers::CallerMark;
use crate::state::shmem::Shared;
use crate::state::slots::ReservationSlot;

const CLAIMING: u64 = u64::MAX;
const PROBES: u64 = 8;

/// What a reservation took of the budgets.
#[derive(Clone, Copy, Debug)]
pub struct Hold {
    pub amount: u64,
    /// The day number its period began on.
    pub period: i32,
    /// The user's member entry (u32::MAX: none) and hash.
    pub index: u32,
    pub hash: u64,
}

impl Hold {
    pub const NONE_INDEX: u32 = u32::MAX;
    const NO_PERIOD: i32 = i32::MIN;

    /// Whether the reservation was made under a budget.
    pub fn held(&self) -> bool {
        self.period != Self::NO_PERIOD
    }
}

impl Default for Hold {
    /// No budget held.
    fn default() -> Self {
        Hold {
            amount: 0,
            period: Self::NO_PERIOD,
            index: Self::NONE_INDEX,
            hash: 0,
        }
    }
}

/// This reservation let a key's half-open circuit breaker try one request.
pub const FLAG_TRIAL: u32 = 1;
/// This reservation was borrowed beyond the user's share.
pub const FLAG_BORROWED: u32 = 2;
/// This reservation counts against its key's `max_concurrent` (state/open_count.rs) until it
/// is settled or released, or its lease ends.
pub const FLAG_CONCURRENT: u32 = 4;
/// This reservation counts against its user's `user_max_concurrent` (in its caller entry).
pub const FLAG_CALLER_OPEN: u32 = 8;
/// This reservation counts against its API token's `max_concurrent`.
pub const FLAG_TOKEN_OPEN: u32 = 16;

/// Reservations open right now: issued, neither settled nor released, within their lease.
pub fn open_count(sh: &Shared, now_ms: i64, lease_ms: i64) -> usize {
    sh.reservations
        .iter()
        .filter(|s| {
            let id = s.id.load(Acquire);
            id != 0 && id != CLAIMING && now_ms - s.at_ms.load(Relaxed) <= lease_ms
        })
        .count()
}

/// What a reservation holds.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub dboid: u32,
    pub scope_slot: u32,
    pub key_slot: u32,
    pub scope_id: i64,
    pub key_id: i64,
    pub at_ms: i64,
    pub day_start_ms: i64,
    pub est_tokens: i64,
    pub flags: u32,
    pub pool_slot: u32,
    pub member_index: u32,
    pub member_hash: u64,
    pub member_day: i32,
    /// The role that reserved (its oid).
    pub role: u32,
    /// What it holds of its pool's budget (budgets.rs).
    pub hold: Hold,
    /// Where its grant was counted against its user's minute (callers.rs).
    pub caller: CallerMark,
    /// Where it was counted against its API token's limits.
    pub token: CallerMark,
}

/// How a reservation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Closed {
    Settled = 1,
    Released = 2,
    Expired = 3,
    Evicted = 4,
}

impl Closed {
    fn from_u32(v: u32) -> Option<Closed> {
        match v {
            1 => Some(Closed::Settled),
            2 => Some(Closed::Released),
            3 => Some(Closed::Expired),
            4 => Some(Closed::Evicted),
            _ => None,
        }
    }
}

/// Why a reservation could not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotOpen {
    /// Never issued by this server run (or issued in another database).
    Unknown,
    /// It ended already, in this way.
    Closed(Closed),
    /// Past its lease; its estimate stays charged.
    Expired,
    /// Issued, but its slot was reused long ago: it expired or ended.
    Gone,
    /// Another role's, and the caller may not close it.
    Forbidden,
}

fn slot(sh: &Shared, n: u64) -> &ReservationSlot {
    &sh.reservations[(n % sh.reservations.len() as u64) as usize]
}

fn write(s: &ReservationSlot, id: u64, r: &Record) {
    s.dboid.store(r.dboid, Relaxed);
    s.scope_slot.store(r.scope_slot, Relaxed);
    s.key_slot.store(r.key_slot, Relaxed);
    s.scope_id.store(r.scope_id, Relaxed);
    s.key_id.store(r.key_id, Relaxed);
    s.at_ms.store(r.at_ms, Relaxed);
    s.day_start_ms.store(r.day_start_ms, Relaxed);
    s.est_tokens.store(r.est_tokens, Relaxed);
    s.flags.store(r.flags, Relaxed);
    s.pool_slot.store(r.pool_slot, Relaxed);
    s.member_index.store(r.member_index, Relaxed);
    s.member_hash.store(r.member_hash, Relaxed);
    s.member_day.store(r.member_day, Relaxed);
    s.role.store(r.role, Relaxed);
    s.cost_held.store(r.hold.amount, Relaxed);
    s.spend_period.store(r.hold.period, Relaxed);
    s.spend_index.store(r.hold.index, Relaxed);
    s.spend_hash.store(r.hold.hash, Relaxed);
    s.caller_index.store(r.caller.index, Relaxed);
    s.caller_hash.store(r.caller.hash, Relaxed);
    s.caller_at_ms.store(r.caller.at_ms, Relaxed);
    s.token_index.store(r.token.index, Relaxed);
    s.token_hash.store(r.token.hash, Relaxed);
    s.token_at_ms.store(r.token.at_ms, Relaxed);
    s.id.store(id, Release);
}

fn read(s: &ReservationSlot) -> Record {
    Record {
        dboid: s.dboid.load(Relaxed),
        scope_slot: s.scope_slot.load(Relaxed),
        key_slot: s.key_slot.load(Relaxed),
        scope_id: s.scope_id.load(Relaxed),
        key_id: s.key_id.load(Relaxed),
        at_ms: s.at_ms.load(Relaxed),
        day_start_ms: s.day_start_ms.load(Relaxed),
        est_tokens: s.est_tokens.load(Relaxed),
        flags: s.flags.load(Relaxed),
        pool_slot: s.pool_slot.load(Relaxed),
        member_index: s.member_index.load(Relaxed),
        member_hash: s.member_hash.load(Relaxed),
        member_day: s.member_day.load(Relaxed),
        role: s.role.load(Relaxed),
        hold: Hold {
            amount: s.cost_held.load(Relaxed),
            period: s.spend_period.load(Relaxed),
            index: s.spend_index.load(Relaxed),
            hash: s.spend_hash.load(Relaxed),
        },
        caller: CallerMark {
            index: s.caller_index.load(Relaxed),
            hash: s.caller_hash.load(Relaxed),
            at_ms: s.caller_at_ms.load(Relaxed),
        },
        token: CallerMark {
            index: s.token_index.load(Relaxed),
            hash: s.token_hash.load(Relaxed),
            at_ms: s.token_at_ms.load(Relaxed),
        },
    }
}

fn mark_closed(s: &ReservationSlot, id: u64, how: Closed) {
    s.closed_how.store(how as u32, Relaxed);
    s.closed_id.store(id, Release);
}

/// Opens a reservation and returns its id.
pub fn open(sh: &Shared, record: &Record, now_ms: i64, lease_ms: i64) -> u64 {
    let id = sh.header.next_reservation.fetch_add(1, AcqRel);
    for p in 0..PROBES {
        let s = slot(sh, id + p);
        let current = s.id.load(Acquire);
        if current == 0 {
            if s.id.compare_exchange(0, CLAIMING, AcqRel, Relaxed).is_ok() {
                write(s, id, record);
                return id;
            }
        } else if current != CLAIMING
            && s.dboid.load(Relaxed) == record.dboid
            && now_ms - s.at_ms.load(Relaxed) > lease_ms
            && s.id.compare_exchange(current, CLAIMING, AcqRel, Relaxed).is_ok()
        {
            mark_closed(s, current, Closed::Expired);
            write(s, id, record);
            return id;
        }
    }
    // Every candidate holds a live reservation: expire the oldest one early.
    let s = slot(sh, id);
    loop {
        let current = s.id.load(Acquire);
        if current != CLAIMING && s.id.compare_exchange(current, CLAIMING, AcqRel, Relaxed).is_ok() {
            if current != 0 {
                mark_closed(s, current, Closed::Evicted);
                sh.header.reservations_evicted.fetch_add(1, Relaxed);
            }
            write(s, id, record);
            return id;
        }
        std::hint::spin_loop();
    }
}

/// What open reservation `id` of database `dboid` holds, without closing it, if `may_close`
/// allows the caller to close it; the same refusals as [`close`] otherwise.
pub fn peek(
    sh: &Shared,
    id: u64,
    dboid: u32,
    now_ms: i64,
    lease_ms: i64,
    may_close: impl Fn(&Record) -> bool,
) -> Result<Record, NotOpen> {
    for p in 0..PROBES {
        let s = slot(sh, id + p);
        if s.id.load(Acquire) != id {
            continue;
        }
        let record = read(s);
        // Still the same reservation after the read: its fields are its own.
        if s.id.load(Acquire) != id {
            break;
        }
        if record.dboid != dboid {
            return Err(NotOpen::Unknown);
        }
        if !may_close(&record) {
            return Err(NotOpen::Forbidden);
        }
        if now_ms - record.at_ms > lease_ms {
            return Err(NotOpen::Expired);
        }
        return Ok(record);
    }
    Err(why_not_open(sh, id, dboid, may_close))
}

/// Closes reservation `id` of database `dboid` and returns what it held, if `may_close` allows
/// the caller to (it is asked before anything changes or is told about the reservation).
pub fn close(
    sh: &Shared,
    id: u64,
    dboid: u32,
    now_ms: i64,
    lease_ms: i64,
    how: Closed,
    may_close: impl Fn(&Record) -> bool,
) -> Result<Record, NotOpen> {
    for p in 0..PROBES {
        let s = slot(sh, id + p);
        if s.id.load(Acquire) != id {
            continue;
        }
        let record = read(s);
        if record.dboid != dboid {
            return Err(NotOpen::Unknown);
        }
        if !may_close(&record) {
            return Err(NotOpen::Forbidden);
        }
        let expired = now_ms - record.at_ms > lease_ms;
        if s.id.compare_exchange(id, 0, AcqRel, Relaxed).is_ok() {
            if expired {
                mark_closed(s, id, Closed::Expired);
                return Err(NotOpen::Expired);
            }
            mark_closed(s, id, how);
            return Ok(record);
        }
        break;
    }
    Err(why_not_open(sh, id, dboid, may_close))
}

/// Why reservation `id` is not open (asking `may_close` before telling anything about it).
fn why_not_open(sh: &Shared, id: u64, dboid: u32, may_close: impl Fn(&Record) -> bool) -> NotOpen {
    for p in 0..PROBES {
        let s = slot(sh, id + p);
        if s.closed_id.load(Acquire) == id {
            // The slot still holds the closed reservation's fields until it is reused.
            let record = read(s);
            if record.dboid != dboid {
                return NotOpen::Unknown;
            }
            if !may_close(&record) {
                return NotOpen::Forbidden;
            }
            return match Closed::from_u32(s.closed_how.load(Relaxed)) {
                Some(Closed::Expired) => NotOpen::Expired,
                Some(how) => NotOpen::Closed(how),
                None => NotOpen::Gone,
            };
        }
    }
    let first = sh.header.first_reservation.load(Relaxed);
    let next = sh.header.next_reservation.load(Relaxed);
    if id < first || id >= next {
        NotOpen::Unknown
    } else {
        NotOpen::Gone
    }
}
