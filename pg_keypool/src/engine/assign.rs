//! Assigning a user of a pool to the least-loaded usable key: in shared memory at once (so that
//! concurrent signups see each other), in `keypool.member` in the same transaction, and taken
//! back with it. The SQL functions that change membership are in api/membership.rs.
//!
//! `keypool.member` is the truth. Shared memory holds each pool's aggregates (members per weight
//! class and day of last activity) and each key's count of members, for every member, and a
//! cache of the members active recently (members.rs). An assignment reads the member's row,
//! then changes the aggregates and counts at once (so that concurrent signups see each other)
//! and the cached entry if there is one; all of it is rolled back with the transaction
//! (txn.rs). The least-loaded key comes from a segment tree per pool (tree.rs) kept in an arena
//! of shared memory, rebuilt when the pool's usable keys change.

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::Ordering::Acquire;

use crate::catalog::config::{self};
use crate::catalog::model::{Config, Pool};
use crate::engine::key_tree::{add_assigned, ensure_tree, key_slot_in, least_loaded, Stale};
use crate::engine::member_cache;
use crate::engine::member_cache::{as_owner, Stored};
use crate::engine::member_load::{ensure_loaded, too_many_weights};
use crate::errors::{self, Code};
use crate::policy::shares::{PoolShares, NEVER, WEIGHT_SCALE};
use crate::state::clock;
use crate::state::members::{self, Member, FLAG_MEMBER, FLAG_PINNED};
use crate::state::shmem::{self, Shared};
use crate::state::txn;

/// A change to one member: enough to take it back in the aggregates, the keys' counts and the
/// cache (which may or may not hold the member).
#[derive(Clone, Copy)]
pub struct Change {
    pub hash: u64,
    pub was_member: bool,
    pub before_key: i64,
    pub before_class: u16,
    pub after_key: i64,
    pub after_class: u16,
    /// The member's last active day when the change was made.
    pub last_active: i32,
    /// Key slots of the key given up and the key taken (u32::MAX: none).
    pub from_slot: u32,
    pub to_slot: u32,
    /// Only the key changes (a move): membership and class are left as they are.
    pub key_only: bool,
}

impl Change {
    /// Writes what the change made of the member into their cached entry.
    pub fn write_to(&self, m: &mut Member) {
        m.key_id = self.after_key;
        if !self.key_only {
            if !m.is_member() {
                // A guest's entry keeps the day it was last seen there; a member's is the day
                // the aggregates count them active on.
                m.last_active = self.last_active;
            }
            m.class = self.after_class as u8;
            m.flags |= FLAG_MEMBER;
        }
    }
}

/// The member's state before a change: from the cache if it holds them, else from the table
/// (`stored`), else a new member.
#[derive(Clone, Copy)]
pub struct Before {
    pub member: bool,
    pub key_id: i64,
    pub class: u16,
    pub last_active: i32,
}

pub fn before_of(shares: &mut PoolShares, pool: &Pool, cached: Option<&Member>, stored: Option<&Stored>) -> Before {
    match (cached, stored) {
        (Some(m), _) => Before {
            member: m.is_member(),
            key_id: if m.is_member() { m.key_id } else { 0 },
            class: u16::from(m.class),
            last_active: if m.is_member() { m.last_active } else { NEVER },
        },
        (None, Some(s)) => Before {
            member: true,
            key_id: s.key_id,
            class: shares
                .class_of(s.weight_milli)
                .unwrap_or_else(|| too_many_weights(&pool.name)),
            last_active: s.last_active,
        },
        (None, None) => Before {
            member: false,
            key_id: 0,
            class: 0,
            last_active: NEVER,
        },
    }
}

/// Makes `change` in the aggregates, the keys' counts and the cached entry if there is one
/// (pinned until the transaction ends). Called with the pool locked.
pub fn apply(sh: &Shared, shares: &mut PoolShares, pool_slot: u32, c: &Change) {
    if c.key_only {
    } else if !c.was_member {
        shares.add_member(c.after_class, c.last_active);
    } else if c.before_class != c.after_class {
        shares.remove_member(c.before_class, c.last_active);
        shares.add_member(c.after_class, c.last_active);
    }
    if c.from_slot != u32::MAX {
        add_assigned(sh, shares, c.from_slot, c.before_key, -1);
    }
    if c.to_slot != u32::MAX {
        add_assigned(sh, shares, c.to_slot, c.after_key, 1);
    }
    let stripe = sh.members.stripe(c.hash);
    if let Some(i) = stripe.find(c.hash, pool_slot) {
        let m = stripe.at(i);
        c.write_to(m);
        m.flags |= FLAG_PINNED;
    }
}

/// Takes `changes` back (newest first) in the aggregates, the keys' counts and the cache.
///
/// `entries`: whether cached entries go back to their state before the change (a rollback:
/// the table keeps what it had), or keep what they hold and are only unpinned (another
/// transaction's assignment of the same user won: it committed first, and its own change is in
/// the entry).
fn revert(sh: &Shared, pool_slot: u32, changes: &[Change], entries: bool) {
    let slot = sh.pool(pool_slot);
    let mut shares = slot.lock();
    for c in changes.iter().rev() {
        let stripe = sh.members.stripe(c.hash);
        let found = stripe.find(c.hash, pool_slot).map(|i| stripe.at(i));
        let last_active = match &found {
            Some(m) if entries => m.last_active,
            _ => c.last_active,
        };
        let entry = match found {
            Some(m) if !entries => {
                // Which state it holds, the winner's or this change's, is not known here: read
                // the user again from the table unless it holds use not flushed yet (the caller
                // then sets its key, assign()).
                m.flags &= !FLAG_PINNED;
                m.forget();
                None
            }
            other => other,
        };
        if c.key_only {
        } else if !c.was_member {
            shares.remove_member(c.after_class, last_active);
        } else if c.before_class != c.after_class {
            shares.remove_member(c.after_class, last_active);
            shares.add_member(c.before_class, last_active);
        }
        if let Some(m) = entry {
            m.key_id = c.before_key;
            m.flags &= !FLAG_PINNED;
            if !c.key_only {
                m.class = c.before_class as u8;
                if !c.was_member {
                    m.flags &= !FLAG_MEMBER;
                }
            }
        }
        drop(stripe);
        if c.to_slot != u32::MAX {
            add_assigned(sh, &shares, c.to_slot, c.after_key, -1);
        }
        if c.from_slot != u32::MAX {
            add_assigned(sh, &shares, c.from_slot, c.before_key, 1);
        }
    }
}

/// Changes made to a pool's members that follow the transaction (see [`track`]).
pub struct Tracked {
    pub sh: &'static Shared,
    pub pool_slot: u32,
    pub gen: u32,
    pub changes: Rc<std::cell::RefCell<Vec<Change>>>,
}

impl Tracked {
    /// Takes back at once the changes of the users `not_made` (another transaction assigned
    /// them first); they are no longer followed.
    pub fn revert_now(&self, not_made: &HashSet<u64>) {
        if not_made.is_empty() || self.sh.pool(self.pool_slot).members_gen.load(Acquire) != self.gen {
            return;
        }
        let gone: Vec<Change> = {
            let mut v = self.changes.borrow_mut();
            let (gone, kept): (Vec<Change>, Vec<Change>) = v.drain(..).partition(|c| not_made.contains(&c.hash));
            *v = kept;
            gone
        };
        revert(self.sh, self.pool_slot, &gone, false);
    }
}

/// Follows `changes` made to `pool_slot`'s members (in generation `gen`) to the end of the
/// transaction: taken back if it aborts; when it ends either way, the entries are unpinned and
/// the stripes' epochs bumped (a lookup that raced with the change is done again); when it
/// commits, entries cached meanwhile from the table's old rows get the change too.
pub fn track(sh: &'static Shared, pool_slot: u32, gen: u32, changes: Vec<Change>) -> Tracked {
    let changes = Rc::new(std::cell::RefCell::new(changes));
    let tracked = Tracked {
        sh,
        pool_slot,
        gen,
        changes: Rc::clone(&changes),
    };
    if changes.borrow().is_empty() {
        return tracked;
    }
    let undo = Rc::clone(&changes);
    txn::on_abort_or_prepare(pool_slot, move || {
        if sh.pool(pool_slot).members_gen.load(Acquire) == gen {
            revert(sh, pool_slot, &undo.borrow_mut().drain(..).collect::<Vec<_>>(), true);
        }
    });
    txn::at_end(move |committed| {
        let changes = changes.borrow();
        if sh.pool(pool_slot).members_gen.load(Acquire) == gen {
            for c in changes.iter() {
                let stripe = sh.members.stripe(c.hash);
                if let Some(i) = stripe.find(c.hash, pool_slot) {
                    let m = stripe.at(i);
                    m.flags &= !FLAG_PINNED;
                    if committed {
                        c.write_to(m);
                    }
                }
            }
        }
        sh.members.bump_epochs(changes.iter().map(|c| c.hash));
    });
    tracked
}

/// Gives `hash` a key of `pool` unless it has a valid one; returns its key and the change made.
/// `stored` is the member's row of the table as the caller read it.
pub fn assign_locked(
    sh: &'static Shared,
    cfg: &Config,
    pool: &Pool,
    shares: &mut PoolShares,
    hash: u64,
    stored: Option<&Stored>,
) -> Result<(i64, Option<Change>), Stale> {
    let cached = {
        let stripe = sh.members.stripe(hash);
        stripe.find(hash, pool.slot).map(|i| *stripe.at(i))
    };
    // The caller read the table (with its latest state): a cached membership the table does
    // not have is another transaction's, not committed yet. This assignment counts on its own;
    // whichever of the two loses at the INSERT takes its change back.
    let cached = cached.filter(|m| !m.is_member() || stored.is_some());
    let before = before_of(shares, pool, cached.as_ref(), stored);
    let current = (before.member && before.key_id != 0)
        .then(|| key_slot_in(cfg, pool, before.key_id))
        .flatten();
    if current.is_some() {
        return Ok((before.key_id, None));
    }
    ensure_tree(sh, cfg, pool, shares)?;
    let Some(key_id) = least_loaded(sh, shares) else {
        errors::error(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("pool \"{}\" has no usable key to assign users to", pool.name),
        )
        .hint("Add a key with keypool_add_key(), or enable one with keypool_enable_key().")
        .raise()
    };
    let after_class = if before.member {
        before.class
    } else {
        shares
            .class_of(WEIGHT_SCALE)
            .unwrap_or_else(|| too_many_weights(&pool.name))
    };
    let change = Change {
        hash,
        was_member: before.member,
        before_key: before.key_id,
        before_class: before.class,
        after_key: key_id,
        after_class,
        last_active: before.last_active,
        from_slot: if before.member && before.key_id != 0 {
            key_slot_in(cfg, pool, before.key_id).unwrap_or(u32::MAX)
        } else {
            u32::MAX
        },
        to_slot: key_slot_in(cfg, pool, key_id).unwrap_or(u32::MAX),
        key_only: false,
    };
    apply(sh, shares, pool.slot, &change);
    Ok((key_id, Some(change)))
}

/// Runs `f` with the pool locked and its members loaded, reloading the configuration when the
/// tree is newer than this backend's view.
pub fn with_pool<R>(
    pool_name: &str,
    mut f: impl FnMut(&Rc<Config>, &Pool, &mut PoolShares) -> Result<R, Stale>,
) -> (Rc<Config>, R) {
    let sh = shmem::shared();
    let mut cfg = config::current();
    for _ in 0..3 {
        let pool = pool_or_error(&cfg, pool_name);
        ensure_loaded(sh, &cfg, pool);
        let result = {
            let mut shares = sh.pool(pool.slot).lock();
            shares.roll(pool.day(clock::now_ms()).0);
            f(&cfg, pool, &mut shares)
        };
        match result {
            Ok(r) => return (cfg, r),
            Err(Stale) => cfg = config::reload_now(),
        }
    }
    errors::error(
        Code::ERRCODE_INTERNAL_ERROR,
        "pg_keypool: the pool's keys kept changing during an assignment",
    )
    .raise()
}

pub fn pool_or_error<'c>(cfg: &'c Config, pool_name: &str) -> &'c Pool {
    cfg.pool_by_name(pool_name).unwrap_or_else(|| {
        errors::undefined(format!("pool \"{pool_name}\" does not exist"))
            .hint("Create it with keypool_create_pool().")
            .raise()
    })
}

/// Assigns one user (idempotent) and returns the key.
///
/// The member's row is read first (the cache may not hold them); a new key is chosen in shared
/// memory (so that concurrent signups see each other), then written with one INSERT, which also
/// makes a concurrent assignment of the same user wait for the other transaction to end. If the
/// table already had the user, the table wins and the choice made here is taken back.
pub fn assign(user: &str, pool_name: &str) -> (Rc<Config>, i64) {
    let sh = shmem::shared();
    let cfg = config::current();
    let pool = pool_or_error(&cfg, pool_name);
    let stored = member_cache::lookup(&cfg, pool, user);
    if let Some(s) = stored.filter(|s| s.key_id != 0 && key_slot_in(&cfg, pool, s.key_id).is_some()) {
        return (cfg, s.key_id);
    }
    let hash_of = |cfg: &Config, pool: &Pool| members::user_hash(cfg.owner.instance, pool.id, user);
    let (cfg, (key_id, gen, change)) = with_pool(pool_name, |cfg, pool, shares| {
        let gen = sh.pool(pool.slot).members_gen.load(Acquire);
        let (key, change) = assign_locked(sh, cfg, pool, shares, hash_of(cfg, pool), stored.as_ref())?;
        Ok((key, gen, change))
    });
    let pool = pool_or_error(&cfg, pool_name);
    let hash = hash_of(&cfg, pool);
    let tracked = track(sh, pool.slot, gen, change.into_iter().collect());
    if stored.is_some() {
        // A member whose key was removed: the key chosen here replaces it.
        as_owner(&cfg, |client| {
            errors::spi(client.update(
                "UPDATE keypool.member SET key_id = $3 WHERE pool_id = $1 AND user_id = $2",
                None,
                &[pool.id.into(), user.into(), key_id.into()],
            ));
        });
        return (cfg, key_id);
    }
    let inserted = as_owner(&cfg, |client| {
        let t = errors::spi(client.update(
            "INSERT INTO keypool.member (pool_id, user_id, user_hash, key_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT (pool_id, user_id) DO NOTHING RETURNING 1",
            None,
            &[
                pool.id.into(),
                user.into(),
                members::hash_to_sql(hash).into(),
                key_id.into(),
            ],
        ));
        !t.is_empty()
    });
    if inserted {
        return (cfg, key_id);
    }
    // Another transaction assigned the user meanwhile (and committed): its choice stands,
    // unless its key is gone too.
    tracked.revert_now(&HashSet::from([hash]));
    match member_cache::lookup(&cfg, pool, user) {
        Some(s) if s.key_id != 0 && key_slot_in(&cfg, pool, s.key_id).is_some() => {
            set_cached_key(sh, pool_name, hash, &s);
            (cfg, s.key_id)
        }
        _ => errors::error(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("user \"{user}\" was assigned by another transaction at the same time"),
        )
        .hint("Try again.")
        .raise(),
    }
}

/// Makes a cached entry of the user a member on the stored key (its use of the day stays).
fn set_cached_key(sh: &'static Shared, pool_name: &str, hash: u64, stored: &Stored) {
    with_pool(pool_name, |_, pool, shares| {
        let class = shares.class_of(stored.weight_milli).unwrap_or(0) as u8;
        let stripe = sh.members.stripe(hash);
        if let Some(i) = stripe.find(hash, pool.slot) {
            let m = stripe.at(i);
            m.key_id = stored.key_id;
            m.class = class;
            m.flags |= FLAG_MEMBER;
        }
        Ok(())
    });
}
