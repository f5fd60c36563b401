//! Binds shared-memory slots to rows: which scope slot holds scope 17 of this database.
//!
//! A backend binds slots when it (re)loads its configuration: one pass over each slot array
//! under the registry lock finds the slots it already owns and takes free ones for new rows.
//! A slot is taken back only when that loses nothing:
//! - its owner is gone (the database was dropped, or the extension re-created in it), or
//! - it belongs to this owner, its row is no longer in the configuration, it is idle (no
//!   charge in its windows, no cooldown, no unflushed counters), and no backend has bound or
//!   confirmed it for `RECLAIM_GRACE_MS`. A row missing from our snapshot may be another
//!   transaction's uncommitted insert: without the grace, two open transactions that each add
//!   keys and reserve would take each other's slots back in turn.
//!
//! Every hot-path use re-checks the slot's tag (under the scope lock for scopes), so a backend
//! with an older cache never writes into a slot that was re-bound; it reloads instead.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use crate::errors::{self, Code};
use crate::policy::shares::PoolShares;
use crate::policy::window::ScopeWindows;
use crate::state::shmem::Shared;
use crate::state::slots::{KeySlot, Owner, PoolSlot, ScopeSlot, Tag, MEMBERS_UNLOADED};

/// What the registry needs to know about a kind of slot.
trait Slot {
    fn tag(&self) -> &Tag;
    /// True when taking the slot back loses no information.
    fn is_idle(&self, now_ms: i64) -> bool;
    /// Clears all state before the slot is bound to a new row.
    fn reset(&self);
}

impl Slot for ScopeSlot {
    fn tag(&self) -> &Tag {
        &self.tag
    }

    fn is_idle(&self, now_ms: i64) -> bool {
        self.cooling(now_ms).is_none() && self.lock().is_idle(now_ms)
    }

    fn reset(&self) {
        let mut w = self.lock();
        *w = ScopeWindows::default();
        self.cooling_until_ms.store(0, Ordering::Release);
        self.cooling_reason.store(0, Ordering::Release);
        self.caught_up_epoch.store(0, Ordering::Release);
    }
}

impl Slot for KeySlot {
    fn tag(&self) -> &Tag {
        &self.tag
    }

    fn is_idle(&self, _now_ms: i64) -> bool {
        !self.has_pending()
            && self.breaker_open_until_ms.load(Ordering::Acquire) == 0
            && self.trial_since_ms.load(Ordering::Acquire) == 0
            && self.assigned.load(Ordering::Acquire) == 0
    }

    fn reset(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        self.breaker_open_until_ms.store(0, Ordering::Release);
        self.trial_since_ms.store(0, Ordering::Release);
        self.last_used_ms.store(0, Ordering::Release);
        for c in &self.counters {
            c.store(0, Ordering::Release);
        }
        self.assigned.store(0, Ordering::Release);
        self.tree_build.store(0, Ordering::Release);
    }
}

impl Slot for PoolSlot {
    fn tag(&self) -> &Tag {
        &self.tag
    }

    fn is_idle(&self, _now_ms: i64) -> bool {
        true
    }

    fn reset(&self) {
        self.cursor.store(0, Ordering::Release);
        self.after_prepared.store(0, Ordering::Release);
        self.guests_reset();
        self.fell_through.reset();
        self.spend.reset();
        let mut shares = self.lock();
        *shares = PoolShares::default();
        // Member entries of the previous binding become stale.
        self.members_gen.fetch_add(1, Ordering::AcqRel);
        self.members_state.store(MEMBERS_UNLOADED, Ordering::Release);
    }
}

/// How long a slot stays bound after the last backend that wanted it bound or confirmed it.
const RECLAIM_GRACE_MS: i64 = 10_000;

/// Slot numbers bound to the rows of one configuration.
#[derive(Default)]
pub struct Bindings {
    pub scopes: HashMap<i64, u32>,
    pub keys: HashMap<i64, u32>,
    pub pools: HashMap<i64, u32>,
}

/// The rows a configuration needs slots for.
pub struct Wanted<'a> {
    pub scopes: &'a [i64],
    pub keys: &'a [i64],
    pub pools: &'a [i64],
}

/// Binds a slot to every wanted row. `live_databases` are the OIDs in `pg_database`.
pub fn bind(sh: &Shared, owner: Owner, wanted: Wanted<'_>, live_databases: &HashSet<u32>, now_ms: i64) -> Bindings {
    let _registry = sh.header.registry.exclusive();
    let dead =
        |o: Owner| !live_databases.contains(&o.dboid) || (o.dboid == owner.dboid && o.instance != owner.instance);
    Bindings {
        scopes: bind_kind(
            sh.scopes,
            owner,
            wanted.scopes,
            &dead,
            now_ms,
            "scopes",
            "pg_keypool.max_scopes",
        ),
        keys: bind_kind(
            sh.keys,
            owner,
            wanted.keys,
            &dead,
            now_ms,
            "keys",
            "pg_keypool.max_keys",
        ),
        pools: bind_kind(
            sh.pools,
            owner,
            wanted.pools,
            &dead,
            now_ms,
            "pools",
            "pg_keypool.max_pools",
        ),
    }
}

fn bind_kind<S: Slot>(
    slots: &[S],
    owner: Owner,
    wanted: &[i64],
    dead: &dyn Fn(Owner) -> bool,
    now_ms: i64,
    what: &str,
    setting: &str,
) -> HashMap<i64, u32> {
    let wanted_set: HashSet<i64> = wanted.iter().copied().collect();
    let newest_wanted = wanted.iter().copied().max().unwrap_or(0);
    let mut bound: HashMap<i64, u32> = HashMap::with_capacity(wanted.len());
    let mut free: Vec<u32> = Vec::new();
    // Real time, not keypool_now(): a frozen test clock must not pin slots forever.
    let wall = crate::state::clock::real_now_ms();
    for (i, slot) in slots.iter().enumerate() {
        let id = slot.tag().id();
        if id == 0 {
            free.push(i as u32);
            continue;
        }
        let o = slot.tag().owner();
        if o == owner {
            // Rows newer than any this configuration knows may belong to a transaction that
            // committed after our snapshot: never take those back.
            if wanted_set.contains(&id) {
                slot.tag().confirm(wall);
                bound.insert(id, i as u32);
            } else if id <= newest_wanted
                && wall - slot.tag().confirmed_ms() >= RECLAIM_GRACE_MS
                && slot.is_idle(now_ms)
            {
                slot.tag().clear();
                free.push(i as u32);
            }
        } else if dead(o) {
            slot.tag().clear();
            free.push(i as u32);
        }
    }
    let missing: Vec<i64> = wanted.iter().copied().filter(|id| !bound.contains_key(id)).collect();
    if missing.len() > free.len() {
        errors::error(
            Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("too many {what} for pg_keypool's shared memory"),
        )
        .detail(format!(
            "{} {what} are configured in this database and {} more slots are needed, but only {} are free ({setting} = {}).",
            wanted.len(),
            missing.len(),
            free.len(),
            slots.len()
        ))
        .hint(format!("Raise {setting} in postgresql.conf and restart the server."))
        .raise();
    }
    // Take the lowest free slots first: a compact region is faster to scan.
    free.sort_unstable_by(|a, b| b.cmp(a));
    for id in missing {
        let Some(i) = free.pop() else { break };
        let slot = &slots[i as usize];
        slot.reset();
        slot.tag().set(owner, id, wall);
        bound.insert(id, i);
    }
    bound
}
