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
        self.provider.reset();
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
        self.open.reset();
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
        self.active.reset();
        self.minute.reset();
        let mut shares = self.lock();
        *shares = PoolShares::default();
        // Member entries of the previous binding become stale.
        self.members_gen.fetch_add(1, Ordering::AcqRel);
        self.members_state.store(MEMBERS_UNLOADED, Ordering::Release);
    }
}

/// Gives the slots of a key and of its account back at once, if they are still bound to those
/// rows: the rows are gone (a user's own key removed, an add rolled back), so nothing in the
/// slots matters. Under the registry lock, so that no slot re-bound meanwhile is cleared.
pub fn release(sh: &Shared, owner: Owner, key: Option<(u32, i64)>, scope: Option<(u32, i64)>) {
    let _registry = sh.header.registry.exclusive();
    if let Some((slot, id)) = key {
        let k = sh.key(slot);
        if k.tag.is(owner, id) {
            k.tag.clear();
        }
    }
    if let Some((slot, id)) = scope {
        let s = sh.scope(slot);
        if s.tag.is(owner, id) {
            s.tag.clear();
        }
    }
}

/// How long a slot stays bound after the last backend that wanted it bound or confirmed it.
const RECLAIM_GRACE_MS: i64 = 10_000;

/// Slot numbers bound to the rows of one configuration. A row that did not fit (see [`Fit`])
/// has no entry: its key takes no traffic until room is made.
#[derive(Default)]
pub struct Bindings {
    pub scopes: HashMap<i64, u32>,
    pub keys: HashMap<i64, u32>,
    pub pools: HashMap<i64, u32>,
}

/// The rows a configuration needs slots for; scopes and keys say whether they are (of) a
/// user's own key.
pub struct Wanted<'a> {
    pub scopes: &'a [(i64, bool)],
    pub keys: &'a [(i64, bool)],
    pub pools: &'a [i64],
}

/// What to do with rows that do not fit.
#[derive(Clone, Copy, Debug)]
pub enum Fit<'a> {
    /// Refuse (53400) before binding anything when one of these rows (the key and account a
    /// transaction adds) does not fit: the one who adds learns that the configuration does not
    /// fit, and nobody else ever does. Other rows are bound as [`Fit::Lenient`] binds them.
    Strict { keys: &'a [i64], scopes: &'a [i64] },
    /// Bind what fits, shared keys' rows before users' own; leave the rest out. Every backend's
    /// reload binds this way, so that a configuration that cannot fit (another database filled
    /// the slots, the server restarted with smaller settings) never fails anyone's reservation.
    /// Pools are always strict.
    Lenient,
}

/// Binds a slot to every wanted row (see [`Fit`]). `live_databases` are the OIDs in
/// `pg_database`. Users' own keys (and their scopes) never take more than
/// `pg_keypool.owned_key_share` of a slot array, counted over every database.
pub fn bind(
    sh: &Shared,
    owner: Owner,
    wanted: Wanted<'_>,
    live_databases: &HashSet<u32>,
    now_ms: i64,
    fit: Fit<'_>,
) -> Bindings {
    let _registry = sh.header.registry.exclusive();
    let dead =
        |o: Owner| !live_databases.contains(&o.dboid) || (o.dboid == owner.dboid && o.instance != owner.instance);
    let share = crate::settings::OWNED_KEY_SHARE.get().clamp(0.0, 1.0);
    let pools: Vec<(i64, bool)> = wanted.pools.iter().map(|&id| (id, false)).collect();
    let (keys, scopes): (Option<&[i64]>, Option<&[i64]>) = match fit {
        Fit::Strict { keys, scopes } => (Some(keys), Some(scopes)),
        Fit::Lenient => (None, None),
    };
    Bindings {
        scopes: bind_kind(
            sh.scopes,
            Kind::new(owner, "scopes", "pg_keypool.max_scopes", scopes, share),
            wanted.scopes,
            &dead,
            now_ms,
        ),
        keys: bind_kind(
            sh.keys,
            Kind::new(owner, "keys", "pg_keypool.max_keys", keys, share),
            wanted.keys,
            &dead,
            now_ms,
        ),
        pools: bind_kind(
            sh.pools,
            Kind::new(owner, "pools", "pg_keypool.max_pools", Some(wanted.pools), share),
            &pools,
            &dead,
            now_ms,
        ),
    }
}

/// One kind of slot being bound, and how.
struct Kind<'a> {
    owner: Owner,
    what: &'static str,
    setting: &'static str,
    /// The rows that must fit (refused with 53400 otherwise), if any must.
    required: Option<&'a [i64]>,
    owned_share: f64,
}

impl<'a> Kind<'a> {
    fn new(
        owner: Owner,
        what: &'static str,
        setting: &'static str,
        required: Option<&'a [i64]>,
        owned_share: f64,
    ) -> Kind<'a> {
        Kind {
            owner,
            what,
            setting,
            required,
            owned_share,
        }
    }

    fn requires(&self, id: i64) -> bool {
        self.required.is_some_and(|r| r.contains(&id))
    }
}

fn bind_kind<S: Slot>(
    slots: &[S],
    kind: Kind<'_>,
    wanted: &[(i64, bool)],
    dead: &dyn Fn(Owner) -> bool,
    now_ms: i64,
) -> HashMap<i64, u32> {
    let owner = kind.owner;
    let wanted_set: HashMap<i64, bool> = wanted.iter().copied().collect();
    let newest_wanted = wanted.iter().map(|w| w.0).max().unwrap_or(0);
    let mut bound: HashMap<i64, u32> = HashMap::with_capacity(wanted.len());
    let mut free: Vec<u32> = Vec::new();
    // Real time, not keypool_now(): a frozen test clock must not pin slots forever.
    let wall = crate::state::clock::real_now_ms();
    let mut owned_in_use = 0usize;
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
            if let Some(&owned) = wanted_set.get(&id) {
                slot.tag().confirm(wall);
                slot.tag().mark_owned(owned);
                bound.insert(id, i as u32);
            } else if id <= newest_wanted
                && wall - slot.tag().confirmed_ms() >= RECLAIM_GRACE_MS
                && slot.is_idle(now_ms)
            {
                slot.tag().clear();
                free.push(i as u32);
                continue;
            }
        } else if dead(o) {
            slot.tag().clear();
            free.push(i as u32);
            continue;
        }
        if slot.tag().is_owned() {
            owned_in_use += 1;
        }
    }
    // The rows that must fit first, then shared keys' rows, then users' own, each oldest first.
    let mut missing: Vec<(i64, bool)> = wanted
        .iter()
        .copied()
        .filter(|(id, _)| !bound.contains_key(id))
        .collect();
    missing.sort_unstable_by_key(|&(id, owned)| (!kind.requires(id), owned, id));
    let owned_cap = (kind.owned_share * slots.len() as f64).floor() as usize;
    let needed: Vec<(i64, bool)> = missing.iter().copied().filter(|(id, _)| kind.requires(*id)).collect();
    let owned_missing = needed.iter().filter(|m| m.1).count();
    if !needed.is_empty() {
        if needed.len() > free.len() {
            errors::error(
                Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                format!("too many {} for pg_keypool's shared memory", kind.what),
            )
            .detail(format!(
                "{} {} are configured in this database and {} more slots are needed, but only {} are free ({} = {}).",
                wanted.len(),
                kind.what,
                needed.len(),
                free.len(),
                kind.setting,
                slots.len()
            ))
            .hint(format!(
                "Raise {} in postgresql.conf and restart the server.",
                kind.setting
            ))
            .raise();
        }
        if owned_missing > 0 && owned_in_use + owned_missing > owned_cap {
            errors::error(
                Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                format!(
                    "users' own keys would take more than their share of pg_keypool's {}",
                    kind.what
                ),
            )
            .detail(format!(
                "Users' own keys hold {owned_in_use} of the {owned_cap} slots they may take \
                 ({} = {} times pg_keypool.owned_key_share = {}); the rest is kept for shared keys.",
                kind.setting,
                slots.len(),
                kind.owned_share
            ))
            .hint("Remove unused own keys, or raise pg_keypool.owned_key_share or the size setting.")
            .raise();
        }
    }
    // Take the lowest free slots first: a compact region is faster to scan.
    free.sort_unstable_by(|a, b| b.cmp(a));
    let mut left_out = 0usize;
    for (id, owned) in missing {
        if owned && owned_in_use >= owned_cap {
            left_out += 1;
            continue;
        }
        let Some(i) = free.pop() else {
            left_out += 1;
            continue;
        };
        let slot = &slots[i as usize];
        slot.reset();
        slot.tag().set(owner, id, wall);
        slot.tag().mark_owned(owned);
        if owned {
            owned_in_use += 1;
        }
        bound.insert(id, i);
    }
    if left_out > 0 {
        pgrx::log!(
            "pg_keypool: {left_out} {} did not fit in shared memory ({} = {}); their keys take no traffic until room is made",
            kind.what,
            kind.setting,
            slots.len()
        );
    }
    bound
}
