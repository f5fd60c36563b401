//! Users of a pool: counting them into shared memory, assigning each to the least-loaded usable
//! key, and the SQL functions that change membership (`keypool_assign`, the signup trigger,
//! `keypool_backfill`, `keypool_rebalance`, `keypool_remove_key`, `keypool_set_user_weight`).
//!
//! `keypool.member` is the truth. Shared memory holds each pool's aggregates (members per weight
//! class and day of last activity) and each key's count of members, for every member, and a
//! cache of the members active recently (members.rs). An assignment reads the member's row,
//! then changes the aggregates and counts at once (so that concurrent signups see each other)
//! and the cached entry if there is one; all of it is rolled back with the transaction
//! (txn.rs). The least-loaded key comes from a segment tree per pool (tree.rs) kept in an arena
//! of shared memory, rebuilt when the pool's usable keys change.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::rc::Rc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::time::Duration;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{pg_sys, spi, AnyNumeric};

use crate::catalog::config::{self};
use crate::catalog::grants::Privilege;
use crate::catalog::model::{Config, Key, Pool};
use crate::catalog::privilege;
use crate::engine::access::{self};
use crate::engine::args::check_user_id;
use crate::engine::member_cache::{self, Stored};
use crate::errors::{self, Code};
use crate::policy::shares::{PoolShares, TreeMeta, NEVER, WEIGHT_SCALE};
use crate::policy::tree;
use crate::state::clock;
use crate::state::members::{self, Member, FLAG_MEMBER, FLAG_PINNED};
use crate::state::shmem::{self, Shared};
use crate::state::slots::{PoolSlot, MEMBERS_LOADING, MEMBERS_READY, MEMBERS_UNLOADED};
use crate::state::txn;

/// Rows handled per step of a backfill.
const BATCH: i64 = 10_000;
/// Largest weight a user can get.
const MAX_WEIGHT: i64 = 1_000_000;

/// The tree was built from a newer configuration than this backend's: reload and retry.
pub struct Stale;

// ---------------------------------------------------------------------------------------------
// Loading a pool's members

/// Makes sure the pool's members are in shared memory: loads them once after the server starts
/// (every other caller waits for the one loading).
pub fn ensure_loaded(sh: &'static Shared, cfg: &Config, pool: &Pool) {
    let slot = sh.pool(pool.slot);
    if slot.after_prepared.load(Acquire) != 0 {
        reload_after_prepared(slot);
    }
    let me = unsafe { pg_sys::MyProcPid };
    loop {
        match slot.members_state.load(Acquire) {
            MEMBERS_READY => return,
            MEMBERS_LOADING => {
                let pid = slot.loader_pid.load(Acquire);
                if pid == me || (pid != 0 && unsafe { libc::kill(pid, 0) } != 0) {
                    // Our own failed attempt, or a loader that died: start over.
                    let _ = slot
                        .members_state
                        .compare_exchange(MEMBERS_LOADING, MEMBERS_UNLOADED, AcqRel, Acquire);
                } else {
                    std::thread::sleep(Duration::from_millis(2));
                    pgrx::check_for_interrupts!();
                }
            }
            _ => {
                if slot
                    .members_state
                    .compare_exchange(MEMBERS_UNLOADED, MEMBERS_LOADING, AcqRel, Acquire)
                    .is_ok()
                {
                    slot.loader_pid.store(me, Release);
                    break;
                }
            }
        }
    }
    struct Loading(&'static PoolSlot, bool);
    impl Drop for Loading {
        fn drop(&mut self) {
            if !self.1 {
                self.0.members_gen.fetch_add(1, AcqRel);
                self.0.members_state.store(MEMBERS_UNLOADED, Release);
            }
        }
    }
    let mut loading = Loading(slot, false);
    load(sh, cfg, pool, slot);
    slot.members_state.store(MEMBERS_READY, Release);
    loading.1 = true;
}

/// A prepared transaction assigned or moved members of this pool: once none is left (committed
/// or rolled back), the members are read again from the table, which then says what happened.
/// Entries keep today's use; only membership, keys, weights and counts are rebuilt.
#[cold]
fn reload_after_prepared(slot: &PoolSlot) {
    let _path = privilege::pin_search_path();
    let none_left = Spi::get_one::<bool>(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts WHERE database OPERATOR(pg_catalog.=) pg_catalog.current_database())",
    );
    if matches!(none_left, Ok(Some(true)))
        && slot
            .members_state
            .compare_exchange(MEMBERS_READY, MEMBERS_UNLOADED, AcqRel, Acquire)
            .is_ok()
    {
        slot.after_prepared.store(0, Release);
    }
}

/// Loads the members of every pool of this database (views show users per key).
pub fn ensure_all_loaded(sh: &'static Shared, cfg: &Config) {
    for pool in &cfg.pools {
        ensure_loaded(sh, cfg, pool);
    }
}

/// Counts the pool's members into its aggregates (members per weight class and day of last
/// activity, shares fixed and borrowed today, members per key) with one aggregate query, and
/// brings the entries the cache already holds (restored from a clean shutdown, or kept across a
/// reload) in line with the table. Members themselves are cached on their first reservation.
fn load(sh: &'static Shared, cfg: &Config, pool: &Pool, slot: &PoolSlot) {
    if slot.aggregates_restored.swap(0, AcqRel) == 1 {
        // A clean restart: the aggregates, the keys' counts and the cached entries are as they
        // were at the shutdown, and the tables cannot have changed since.
        crate::engine::budgets::restore_pool_spend(sh, cfg, pool);
        return;
    }
    let today = pool.day(clock::now_ms()).0;
    // Grouped by the raw columns (cheapest per row); converted per group.
    let sql = CString::new(format!(
        "SELECT round(weight * {WEIGHT_SCALE})::bigint, coalesce(last_active - DATE '1970-01-01', {NEVER}),
                coalesce(key_id, 0), n, s::bigint, b::bigint
           FROM (SELECT weight, last_active, key_id, count(*) AS n,
                        coalesce(sum(share) FILTER (WHERE used_on = DATE '1970-01-01' + {today}), 0) AS s,
                        coalesce(sum(greatest(used - share, 0)) FILTER (WHERE used_on = DATE '1970-01-01' + {today}), 0) AS b
                   FROM keypool.member WHERE pool_id = {} GROUP BY weight, last_active, key_id) g",
        pool.id
    ))
    .expect("no NUL in the query");
    type Group = (i64, i32, i64, i64, i64, i64);
    let groups: Vec<Group> = privilege::as_owner(cfg.extension_owner, || {
        Spi::connect(|_| {
            crate::catalog::query::fresh_rows_parallel(&sql, |r| {
                (
                    r.get::<i64>(0),
                    r.get::<i32>(1),
                    r.get::<i64>(2),
                    r.get::<i64>(3),
                    r.get::<i64>(4),
                    r.get::<i64>(5),
                )
            })
        })
    });
    crate::engine::budgets::restore_pool_spend(sh, cfg, pool);
    let cached = cached_hashes(sh, pool.slot);
    let stored = stored_members(cfg, pool, &cached);
    let mut shares = slot.lock();
    *shares = PoolShares::default();
    shares.roll(today);
    let mut counts: HashMap<i64, i64> = HashMap::new();
    for (weight, last_active, key_id, n, shares_today, borrowed_today) in groups {
        let class = shares
            .class_of(weight.max(1))
            .unwrap_or_else(|| too_many_weights(&pool.name));
        shares.add_members(class, last_active, n);
        shares.active_shares += shares_today.max(0) as u64;
        shares.borrowed += borrowed_today.max(0) as u64;
        if key_id != 0 {
            *counts.entry(key_id).or_default() += n;
        }
    }
    // Entries already cached: the table says who is a member, on which key, with which
    // weight; an entry's use of today (from a clean shutdown) is newer than the table's.
    for hash in cached {
        let stripe = sh.members.stripe(hash);
        let Some(i) = stripe.find(hash, pool.slot) else {
            continue;
        };
        let m = stripe.at(i);
        let Some(s) = stored.get(&hash) else {
            m.flags &= !FLAG_MEMBER;
            m.key_id = 0;
            continue;
        };
        let entry = *m;
        member_cache::fill(&mut shares, m, s, today);
        if entry.last_active != NEVER && entry.last_active > s.last_active {
            shares.remove_member(u16::from(m.class), s.last_active);
            shares.add_member(u16::from(m.class), entry.last_active);
            m.last_active = entry.last_active;
        }
        if entry.day == today {
            if s.used_on == today {
                shares.active_shares = shares.active_shares.saturating_sub(s.share);
                shares.borrowed = shares.borrowed.saturating_sub(s.used.saturating_sub(s.share));
            }
            shares.active_shares += entry.share;
            shares.borrowed += entry.used.saturating_sub(entry.share);
            m.day = today;
            m.used = entry.used;
            m.share = entry.share;
        }
    }
    for &k in &pool.keys {
        let key = &cfg.keys[k];
        let ks = sh.key(key.slot);
        if ks.tag.is(cfg.owner, key.id) {
            ks.assigned.store(counts.get(&key.id).copied().unwrap_or(0), Release);
            ks.tree_build.store(0, Release);
        }
    }
}

/// Users the cache holds for the pool slot's current generation.
fn cached_hashes(sh: &Shared, pool_slot: u32) -> Vec<u64> {
    let gen = sh.pool(pool_slot).members_gen.load(Acquire);
    let mut out = Vec::new();
    for s in 0..members::STRIPES {
        let stripe = sh.members.stripe_at(s);
        for i in 0..stripe.len() {
            let m = stripe.at(i);
            if m.hash != 0 && m.pool_slot == pool_slot && m.pool_gen == gen {
                out.push(m.hash);
            }
        }
    }
    out
}

/// The table's rows of the given users of the pool.
fn stored_members(cfg: &Config, pool: &Pool, hashes: &[u64]) -> HashMap<u64, Stored> {
    if hashes.is_empty() {
        return HashMap::new();
    }
    let sql_hashes: Vec<i64> = hashes.iter().map(|&h| members::hash_to_sql(h)).collect();
    // Few: an index probe each; many (a cache restored after a clean shutdown): one scan with a
    // hashed list.
    let from = if hashes.len() <= 20_000 {
        "FROM unnest($2::bigint[]) AS u(h) JOIN keypool.member m ON m.pool_id = $1 AND m.user_hash = u.h"
    } else {
        "FROM keypool.member m WHERE m.pool_id = $1 AND m.user_hash = ANY($2)"
    };
    as_owner(cfg, |client| {
        let t = errors::spi(client.select(
            &format!("SELECT m.user_hash, {} {from}", *member_cache::STORED_COLUMNS),
            None,
            &[pool.id.into(), sql_hashes.into()],
        ));
        rows(t, |r| {
            let hash = members::hash_from_sql(r.get::<i64>(1).ok().flatten().unwrap_or(0));
            (hash, stored_of(r, 2))
        })
        .into_iter()
        .collect()
    })
}

fn too_many_weights(pool: &str) -> ! {
    errors::error(
        Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!(
            "pool \"{pool}\" would have more than {} distinct user weights",
            crate::policy::shares::MAX_CLASSES
        ),
    )
    .hint("Use a few tiers (such as 1 for free and 5 for pro) rather than a weight per user.")
    .raise()
}

// ---------------------------------------------------------------------------------------------
// The tree of a pool's keys

/// Keys that take new users: the usable keys of the best priority, in id order.
fn tree_keys<'c>(cfg: &'c Config, pool: &'c Pool) -> Vec<&'c Key> {
    cfg.assignable(pool).collect()
}

#[allow(clippy::mut_from_ref)]
fn cells<'a>(sh: &'a Shared, meta: &TreeMeta) -> &'a mut [u64] {
    // SAFETY: the region belongs to one pool and is only touched under that pool's lock.
    unsafe { std::slice::from_raw_parts_mut(sh.tree_cells[meta.base as usize].0.get(), meta.cap as usize) }
}

/// Makes sure the pool's tree matches this backend's view of its keys.
fn ensure_tree(sh: &'static Shared, cfg: &Config, pool: &Pool, shares: &mut PoolShares) -> Result<(), Stale> {
    let fp = pool.assign_fingerprint;
    let t = shares.tree;
    if t.build != 0 {
        if t.generation > cfg.generation {
            return Err(Stale);
        }
        if t.fingerprint == fp {
            return Ok(());
        }
    }
    let keys = tree_keys(cfg, pool);
    let mut meta = t;
    let need = tree::cells_for(keys.len()) as u32;
    if need > meta.cap {
        let cap = need.next_power_of_two().max(16);
        let base = sh.header.arena_next.fetch_add(cap, AcqRel);
        if base as usize + cap as usize > sh.tree_cells.len() {
            errors::error(
                Code::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "no room left for pg_keypool's key assignment trees",
            )
            .hint("Raise pg_keypool.max_keys and restart the server.")
            .raise();
        }
        meta.base = base;
        meta.cap = cap;
    }
    let leaves: Vec<u64> = keys
        .iter()
        .map(|k| {
            if k.id > u32::MAX as i64 {
                errors::error(
                    Code::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    "key ids above 4294967295 cannot take users",
                )
                .raise();
            }
            tree::pack(sh.key(k.slot).assigned.load(Acquire), k.id)
        })
        .collect();
    tree::build(cells(sh, &meta), &leaves);
    meta.n = keys.len() as u32;
    meta.build = sh.header.tree_builds.fetch_add(1, AcqRel) + 1;
    meta.generation = cfg.generation;
    meta.fingerprint = fp;
    for (pos, k) in keys.iter().enumerate() {
        let ks = sh.key(k.slot);
        ks.tree_pos.store(pos as u32, Release);
        ks.tree_build.store(meta.build, Release);
    }
    shares.tree = meta;
    Ok(())
}

/// Changes a key's count of assigned users (and its leaf, when the key is in the tree).
fn add_assigned(sh: &Shared, shares: &PoolShares, key_slot: u32, key_id: i64, delta: i64) {
    let ks = sh.key(key_slot);
    let count = (ks.assigned.load(Acquire) + delta).max(0);
    ks.assigned.store(count, Release);
    let t = shares.tree;
    if t.build != 0 && ks.tree_build.load(Acquire) == t.build {
        tree::update(
            cells(sh, &t),
            t.n as usize,
            ks.tree_pos.load(Acquire) as usize,
            tree::pack(count, key_id),
        );
    }
}

fn least_loaded(sh: &Shared, shares: &PoolShares) -> Option<i64> {
    let t = shares.tree;
    tree::min(cells(sh, &t), t.n as usize).map(tree::key_of)
}

/// The key's slot, if the key belongs to `pool` in this configuration.
fn key_slot_in(cfg: &Config, pool: &Pool, key_id: i64) -> Option<u32> {
    cfg.key_by_id(key_id).filter(|k| k.pool_id == pool.id).map(|k| k.slot)
}

// ---------------------------------------------------------------------------------------------
// Assigning in shared memory

/// A change to one member: enough to take it back in the aggregates, the keys' counts and the
/// cache (which may or may not hold the member).
#[derive(Clone, Copy)]
struct Change {
    hash: u64,
    was_member: bool,
    before_key: i64,
    before_class: u16,
    after_key: i64,
    after_class: u16,
    /// The member's last active day when the change was made.
    last_active: i32,
    /// Key slots of the key given up and the key taken (u32::MAX: none).
    from_slot: u32,
    to_slot: u32,
    /// Only the key changes (a move): membership and class are left as they are.
    key_only: bool,
}

impl Change {
    /// Writes what the change made of the member into their cached entry.
    fn write_to(&self, m: &mut Member) {
        m.key_id = self.after_key;
        if !self.key_only {
            m.class = self.after_class as u8;
            m.flags |= FLAG_MEMBER;
        }
    }
}

/// The member's state before a change: from the cache if it holds them, else from the table
/// (`stored`), else a new member.
#[derive(Clone, Copy)]
struct Before {
    member: bool,
    key_id: i64,
    class: u16,
    last_active: i32,
}

fn before_of(shares: &mut PoolShares, pool: &Pool, cached: Option<&Member>, stored: Option<&Stored>) -> Before {
    match (cached, stored) {
        (Some(m), _) => Before {
            member: m.is_member(),
            key_id: if m.is_member() { m.key_id } else { 0 },
            class: u16::from(m.class),
            last_active: m.last_active,
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
fn apply(sh: &Shared, shares: &mut PoolShares, pool_slot: u32, c: &Change) {
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
struct Tracked {
    sh: &'static Shared,
    pool_slot: u32,
    gen: u32,
    changes: Rc<std::cell::RefCell<Vec<Change>>>,
}

impl Tracked {
    /// Takes back at once the changes of the users `not_made` (another transaction assigned
    /// them first); they are no longer followed.
    fn revert_now(&self, not_made: &HashSet<u64>) {
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
fn track(sh: &'static Shared, pool_slot: u32, gen: u32, changes: Vec<Change>) -> Tracked {
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
fn assign_locked(
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
fn with_pool<R>(
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

// ---------------------------------------------------------------------------------------------
// SQL

fn as_owner<R>(cfg: &Config, f: impl FnOnce(&mut pgrx::spi::SpiClient<'_>) -> R) -> R {
    privilege::spi_as_owner(cfg.extension_owner, f)
}

fn rows<T>(table: pgrx::spi::SpiTupleTable<'_>, mut f: impl FnMut(&pgrx::spi::SpiHeapTupleData<'_>) -> T) -> Vec<T> {
    table.map(|row| f(&row)).collect()
}

/// The rows of the given users of the pool (by user id), by their hashes.
fn stored_by_user(cfg: &Config, pool: &Pool, users: &[String], hashes: &[u64]) -> HashMap<u64, Stored> {
    let hash_of: HashMap<&str, u64> = users.iter().map(|u| u.as_str()).zip(hashes.iter().copied()).collect();
    as_owner(cfg, |client| {
        let t = errors::spi(client.select(
            // A join with the ids (one index probe each), not `= ANY`: during a backfill the table
            // grows within the transaction and a scan of it per batch would be quadratic.
            &format!(
                "SELECT m.user_id, {} FROM unnest($2::text[]) AS u(id)
                   JOIN keypool.member m ON m.pool_id = $1 AND m.user_id = u.id",
                *member_cache::STORED_COLUMNS
            ),
            None,
            &[pool.id.into(), users.to_vec().into()],
        ));
        rows(t, |r| {
            let user = r.get::<String>(1).ok().flatten().unwrap_or_default();
            (user, stored_of(r, 2))
        })
        .into_iter()
        .filter_map(|(u, s)| Some((*hash_of.get(u.as_str())?, s)))
        .collect()
    })
}

/// A `Stored` from `member_cache::STORED_COLUMNS` at columns `first..first + 6` of a row.
fn stored_of(r: &pgrx::spi::SpiHeapTupleData<'_>, first: usize) -> Stored {
    let get = |i: usize| r.get::<i64>(first + i).ok().flatten().unwrap_or(0);
    let day = |i: usize| r.get::<i32>(first + i).ok().flatten().unwrap_or(NEVER);
    Stored::from_columns(get(0), get(1), day(2), day(3), get(4), get(5))
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

/// `keypool_assign`: the user's key in the pool; a new user gets the usable key with the fewest
/// users (ties: lowest id). Idempotent.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_assign(user_id: Option<&str>, pool: default!(Option<&str>, "'default'")) -> i64 {
    let _path = privilege::pin_search_path();
    let user = check_user_id(user_id);
    let Some(pool) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool, Privilege::Use);
    assign(user, pool).1
}

/// The group number of a key (stable within its pool).
fn group_of(cfg: &Config, key_id: i64) -> Option<i32> {
    cfg.key_by_id(key_id).map(|k| k.group_no)
}

/// Reads a user id column of a supported type as text.
fn id_as_text(tuple: &PgHeapTuple<'_, impl pgrx::WhoAllocated>, column: &str, type_oid: pg_sys::Oid) -> Option<String> {
    let get_err = |e: pgrx::datum::TryFromDatumError| -> ! {
        errors::error(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!("cannot read column \"{column}\": {e}"),
        )
        .raise()
    };
    match type_oid {
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => {
            tuple.get_by_name::<String>(column).unwrap_or_else(|e| get_err(e))
        }
        pg_sys::INT4OID => tuple
            .get_by_name::<i32>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| v.to_string()),
        pg_sys::INT8OID => tuple
            .get_by_name::<i64>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| v.to_string()),
        pg_sys::INT2OID => tuple
            .get_by_name::<i16>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| v.to_string()),
        pg_sys::UUIDOID => tuple
            .get_by_name::<pgrx::Uuid>(column)
            .unwrap_or_else(|e| get_err(e))
            .map(|v| uuid_text(&v)),
        other => unsupported_id_type(column, other),
    }
}

fn uuid_text(u: &pgrx::Uuid) -> String {
    let b = u.as_bytes();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn unsupported_id_type(column: &str, oid: pg_sys::Oid) -> ! {
    errors::error(
        Code::ERRCODE_DATATYPE_MISMATCH,
        format!(
            "user id column \"{column}\" has an unsupported type (oid {})",
            oid.to_u32()
        ),
    )
    .hint("User id columns may be text, varchar, uuid, smallint, integer or bigint.")
    .raise()
}

fn is_supported_id_type(oid: pg_sys::Oid) -> bool {
    matches!(
        oid,
        pg_sys::TEXTOID
            | pg_sys::VARCHAROID
            | pg_sys::BPCHAROID
            | pg_sys::INT2OID
            | pg_sys::INT4OID
            | pg_sys::INT8OID
            | pg_sys::UUIDOID
    )
}

/// `keypool_on_signup(pool, id_column [, group_column])`: a trigger that assigns the new row's
/// user in the pool and, when a group column is named, writes the key's group number into it.
#[pg_trigger]
fn keypool_on_signup<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl pgrx::WhoAllocated>>, pgrx::datum::TryFromDatumError> {
    let _path = privilege::pin_search_path();
    let args = trigger.extra_args().unwrap_or_default();
    if !(2..=3).contains(&args.len()) {
        errors::invalid("keypool_on_signup takes the pool, the user id column and optionally the group column")
            .hint("CREATE TRIGGER t BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION keypool_on_signup('chat', 'id', 'api_key_group')")
            .raise();
    }
    let (pool, id_column, group_column) = (&args[0], &args[1], args.get(2).filter(|g| !g.is_empty()));
    if !matches!(trigger.level(), pgrx::PgTriggerLevel::Row) {
        errors::invalid("keypool_on_signup must be a FOR EACH ROW trigger").raise();
    }
    let before = matches!(trigger.when(), Ok(pgrx::PgTriggerWhen::Before));
    if group_column.is_some() && !before {
        errors::invalid("keypool_on_signup writes the group column only as a BEFORE trigger")
            .hint("Use BEFORE INSERT, or leave out the group column.")
            .raise();
    }
    let Some(new) = trigger.new() else {
        errors::invalid("keypool_on_signup runs on INSERT or UPDATE").raise()
    };
    let rel = trigger
        .relation()
        .unwrap_or_else(|e| errors::invalid(e.to_string()).raise());
    let desc = rel.tuple_desc();
    let type_of = |name: &str| -> Option<pg_sys::Oid> {
        desc.iter()
            .find(|a| !a.is_dropped() && a.name() == name)
            .map(|a| a.type_oid().value())
    };
    let Some(id_type) = type_of(id_column) else {
        errors::error(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{id_column}\" does not exist"),
        )
        .raise()
    };
    if !is_supported_id_type(id_type) {
        unsupported_id_type(id_column, id_type);
    }
    let Some(user) = id_as_text(&new, id_column, id_type) else {
        errors::error(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("the new row's \"{id_column}\" is NULL"),
        )
        .raise()
    };
    // The role inserting the row (current_user) must hold `use` on the pool.
    access::pool(&config::current(), pool, Privilege::Use);
    let (cfg, key_id) = assign(check_user_id(Some(&user)), pool);
    let mut new = new.into_owned();
    if let Some(group_column) = group_column {
        let group = group_of(&cfg, key_id);
        match check_group_column(group_column, type_of(group_column), "the table") {
            pg_sys::INT8OID => new.set_by_name(group_column, group.map(i64::from))?,
            pg_sys::INT2OID => new.set_by_name(group_column, group.map(|g| g as i16))?,
            _ => new.set_by_name(group_column, group)?,
        }
    }
    Ok(Some(new))
}

/// Checks that a group column exists and holds integers; returns its type.
fn check_group_column(column: &str, type_oid: Option<pg_sys::Oid>, table: &str) -> pg_sys::Oid {
    match type_oid {
        Some(t @ (pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID)) => t,
        Some(_) => errors::error(
            Code::ERRCODE_DATATYPE_MISMATCH,
            format!("group column \"{column}\" must be an integer column"),
        )
        .raise(),
        None => errors::error(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{column}\" of {table} does not exist"),
        )
        .raise(),
    }
}

/// Column type of `table.column`, as (type oid, SQL type name).
fn column_type(table: pg_sys::Oid, column: &str) -> Option<(pg_sys::Oid, String)> {
    Spi::connect(|client| {
        let t = errors::spi(client.select(
            "SELECT atttypid, format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute
              WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            None,
            &[table.into(), column.into()],
        ));
        rows(t, |r| {
            (
                r.get::<pg_sys::Oid>(1).ok().flatten(),
                r.get::<String>(2).ok().flatten(),
            )
        })
        .into_iter()
        .next()
        .and_then(|(o, n)| Some((o?, n?)))
    })
}

/// `keypool_backfill`: assigns every user of an existing table (seed 004's migration), in
/// batches, balanced and idempotent; writes group numbers when a group column is named. Returns
/// how many users were newly assigned.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_backfill(
    tbl: Option<pgrx::PgRelation>,
    id_column: Option<&str>,
    pool: default!(Option<&str>, "'default'"),
    group_column: default!(Option<&str>, "NULL"),
) -> i64 {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let Some(tbl) = tbl.map(|r| r.oid()) else {
        errors::null_argument("tbl").raise()
    };
    let Some(id_column) = id_column else {
        errors::null_argument("id_column").raise()
    };
    let Some(pool_name) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool_name, Privilege::Use);
    let table_name: String = Spi::get_one_with_args("SELECT $1::regclass::text", &[tbl.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| errors::undefined(format!("relation {} does not exist", tbl.to_u32())).raise());
    let Some((id_type, id_type_name)) = column_type(tbl, id_column) else {
        errors::error(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{id_column}\" of {table_name} does not exist"),
        )
        .raise()
    };
    if !is_supported_id_type(id_type) {
        unsupported_id_type(id_column, id_type);
    }
    let group_column = group_column.filter(|g| !g.is_empty());
    if let Some(g) = group_column {
        check_group_column(g, column_type(tbl, g).map(|c| c.0), &table_name);
    }
    let id = spi::quote_identifier(id_column);
    let total: i64 = Spi::get_one(&format!("SELECT count(*) FROM {table_name}"))
        .ok()
        .flatten()
        .unwrap_or(0);
    let cfg = config::current();
    let pool = pool_or_error(&cfg, pool_name);
    let pool_id = pool.id;
    let mut last: Option<String> = None;
    let (mut seen, mut added) = (0i64, 0i64);
    loop {
        // The next batch of user ids, in the id column's own order.
        let users: Vec<String> = Spi::connect(|client| {
            // Qualified, so that ORDER BY sorts by the column's own type, not by the text
            // output column of the same name.
            let sql =
                format!(
                "SELECT t.{id}::text FROM {table_name} AS t WHERE t.{id} IS NOT NULL {} ORDER BY t.{id} LIMIT {BATCH}",
                if last.is_some() { format!("AND t.{id} > $1::{id_type_name}") } else { String::new() }
            );
            let args: Vec<DatumWithOid<'_>> = last.iter().map(|l| l.as_str().into()).collect();
            let t = errors::spi(client.select(&sql, None, &args));
            rows(t, |r| r.get::<String>(1).ok().flatten().unwrap_or_default())
        });
        let Some(tail) = users.last().cloned() else { break };
        seen += users.len() as i64;
        added += assign_batch(sh, pool_name, pool_id, &users);
        if let Some(g) = group_column {
            write_groups(
                pool_name,
                &table_name,
                &id,
                &id_type_name,
                &spi::quote_identifier(g),
                &users,
            );
        }
        notice!("keypool_backfill: {seen} of {total} rows of {table_name}, {added} users newly assigned to pool \"{pool_name}\"");
        last = Some(tail);
        if (users.len() as i64) < BATCH {
            break;
        }
    }
    added
}

/// Assigns the users of one batch that are not members yet; returns how many.
fn assign_batch(sh: &'static Shared, pool_name: &str, pool_id: i64, users: &[String]) -> i64 {
    let cfg = config::current();
    let pool = pool_or_error(&cfg, pool_name);
    let hash_of = |u: &str| members::user_hash(cfg.owner.instance, pool_id, u);
    let hashes: Vec<u64> = users.iter().map(|u| hash_of(u)).collect();
    let stored = stored_by_user(&cfg, pool, users, &hashes);
    let new: Vec<(&String, u64)> = users
        .iter()
        .zip(hashes)
        .filter(|(_, h)| {
            stored
                .get(h)
                .is_none_or(|s| s.key_id == 0 || key_slot_in(&cfg, pool, s.key_id).is_none())
        })
        .collect();
    if new.is_empty() {
        return 0;
    }
    let (cfg, (keys, gen, changes)) = with_pool(pool_name, |cfg, pool, shares| {
        let gen = sh.pool(pool.slot).members_gen.load(Acquire);
        let mut keys = Vec::with_capacity(new.len());
        let mut changes = Vec::new();
        for &(_, h) in &new {
            let (key, change) = assign_locked(sh, cfg, pool, shares, h, stored.get(&h))?;
            keys.push(key);
            changes.extend(change);
        }
        Ok((keys, gen, changes))
    });
    let pool = pool_or_error(&cfg, pool_name);
    let tracked = track(sh, pool.slot, gen, changes);
    let names: Vec<String> = new.iter().map(|u| u.0.clone()).collect();
    let sql_hashes: Vec<i64> = new.iter().map(|u| members::hash_to_sql(u.1)).collect();
    // Rows written: new members, and members whose key was removed.
    let written: HashSet<u64> = as_owner(&cfg, |client| {
        let t = errors::spi(client.update(
            "INSERT INTO keypool.member AS m (pool_id, user_id, user_hash, key_id)
             SELECT $1, u, h, k FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(u, h, k)
             ON CONFLICT (pool_id, user_id) DO UPDATE SET key_id = excluded.key_id
              WHERE m.key_id IS NULL
                 OR NOT EXISTS (SELECT 1 FROM keypool.key k WHERE k.id = m.key_id AND k.removed_at IS NULL)
             RETURNING m.user_hash",
            None,
            &[pool_id.into(), names.into(), sql_hashes.into(), keys.into()],
        ));
        rows(t, |r| {
            members::hash_from_sql(r.get::<i64>(1).ok().flatten().unwrap_or(0))
        })
        .into_iter()
        .collect()
    });
    // Users another transaction assigned meanwhile keep that assignment.
    let not_made: HashSet<u64> = new.iter().map(|u| u.1).filter(|h| !written.contains(h)).collect();
    tracked.revert_now(&not_made);
    (new.len() - not_made.len()) as i64
}

/// Writes each user's group number into the application's table.
fn write_groups(pool_name: &str, table: &str, id: &str, id_type: &str, group: &str, users: &[String]) {
    let cfg = config::current();
    let pool = pool_or_error(&cfg, pool_name);
    let assigned: Vec<(String, i64)> = as_owner(&cfg, |client| {
        let t = errors::spi(client.select(
            "SELECT m.user_id, m.key_id FROM unnest($2::text[]) AS u(id)
               JOIN keypool.member m ON m.pool_id = $1 AND m.user_id = u.id AND m.key_id IS NOT NULL",
            None,
            &[pool.id.into(), users.to_vec().into()],
        ));
        rows(t, |r| {
            (
                r.get::<String>(1).ok().flatten().unwrap_or_default(),
                r.get::<i64>(2).ok().flatten().unwrap_or(0),
            )
        })
    });
    let (ids, groups): (Vec<String>, Vec<Option<i32>>) =
        assigned.into_iter().map(|(u, k)| (u, group_of(&cfg, k))).unzip();
    // As the caller: the application's table is theirs to write.
    Spi::connect_mut(|client| {
        errors::spi(client.update(
            &format!(
                "UPDATE {table} AS t SET {group} = v.g FROM unnest($1::text[], $2::int[]) AS v(u, g)
                  WHERE t.{id} = v.u::{id_type} AND t.{group} IS DISTINCT FROM v.g"
            ),
            None,
            &[ids.into(), groups.into()],
        ));
    });
}

/// Moves users of `pool` from the keys listed in `moves` (user id, hash, from key, to key) in
/// the table and in shared memory.
fn apply_moves(sh: &'static Shared, pool_name: &str, moves: &[(String, u64, i64, i64)]) {
    if moves.is_empty() {
        return;
    }
    let (cfg, (gen, changes)) = with_pool(pool_name, |cfg, pool, shares| {
        let gen = sh.pool(pool.slot).members_gen.load(Acquire);
        let mut changes = Vec::new();
        for (_, hash, from, to) in moves {
            // Only the key changes: the class stays whatever it is.
            let c = Change {
                hash: *hash,
                was_member: true,
                before_key: *from,
                before_class: 0,
                after_key: *to,
                after_class: 0,
                last_active: NEVER,
                from_slot: key_slot_in(cfg, pool, *from).unwrap_or(u32::MAX),
                to_slot: key_slot_in(cfg, pool, *to).unwrap_or(u32::MAX),
                key_only: true,
            };
            apply(sh, shares, pool.slot, &c);
            changes.push(c);
        }
        Ok((gen, changes))
    });
    let pool = pool_or_error(&cfg, pool_name);
    track(sh, pool.slot, gen, changes);
    let users: Vec<String> = moves.iter().map(|m| m.0.clone()).collect();
    let keys: Vec<i64> = moves.iter().map(|m| m.3).collect();
    as_owner(&cfg, |client| {
        errors::spi(client.update(
            "UPDATE keypool.member m SET key_id = v.k FROM unnest($2::text[], $3::bigint[]) AS v(u, k)
              WHERE m.pool_id = $1 AND m.user_id = v.u",
            None,
            &[pool.id.into(), users.into(), keys.into()],
        ));
    });
}

/// Users of a key, most recently assigned first.
fn users_of_key(cfg: &Config, pool_id: i64, key_id: i64, limit: Option<i64>) -> Vec<(String, u64)> {
    as_owner(cfg, |client| {
        let t = errors::spi(client.select(
            "SELECT user_id, user_hash FROM keypool.member WHERE pool_id = $1 AND key_id = $2
              ORDER BY assigned_at DESC, user_id LIMIT $3",
            None,
            &[pool_id.into(), key_id.into(), limit.into()],
        ));
        rows(t, |r| {
            (
                r.get::<String>(1).ok().flatten().unwrap_or_default(),
                members::hash_from_sql(r.get::<i64>(2).ok().flatten().unwrap_or(0)),
            )
        })
    })
}

/// How many users each usable key of the pool should give (positive) or take (negative) so that
/// the counts differ by at most one, with the fewest moves.
fn rebalance_plan(counts: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let k = counts.len() as i64;
    if k == 0 {
        return Vec::new();
    }
    let total: i64 = counts.iter().map(|c| c.1).sum();
    let (q, r) = (total / k, total % k);
    // The r fullest keys keep q + 1.
    let mut sorted: Vec<(i64, i64)> = counts.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    sorted
        .iter()
        .enumerate()
        .map(|(i, &(key, count))| (key, count - if (i as i64) < r { q + 1 } else { q }))
        .collect()
}

/// `keypool_rebalance`: after keys were added or removed, moves the fewest users needed so that
/// the usable keys' user counts differ by at most one. Returns how many moved.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_rebalance(pool: default!(Option<&str>, "'default'")) -> i64 {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let Some(pool_name) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool_name, Privilege::Admin);
    let (cfg, counts) = with_pool(pool_name, |cfg, pool, shares| {
        ensure_tree(sh, cfg, pool, shares)?;
        Ok(tree_keys(cfg, pool)
            .iter()
            .map(|k| (k.id, sh.key(k.slot).assigned.load(Acquire)))
            .collect::<Vec<_>>())
    });
    let pool = pool_or_error(&cfg, pool_name);
    let plan = rebalance_plan(&counts);
    let mut takers: Vec<(i64, i64)> = plan.iter().filter(|p| p.1 < 0).map(|&(k, d)| (k, -d)).collect();
    let mut moves: Vec<(String, u64, i64, i64)> = Vec::new();
    for &(from, surplus) in plan.iter().filter(|p| p.1 > 0) {
        for (user, hash) in users_of_key(&cfg, pool.id, from, Some(surplus)) {
            let Some(taker) = takers.iter_mut().find(|t| t.1 > 0) else {
                break;
            };
            taker.1 -= 1;
            moves.push((user, hash, from, taker.0));
        }
    }
    apply_moves(sh, pool_name, &moves);
    if !moves.is_empty() {
        record_event(
            &cfg,
            "rebalanced",
            Some(pool.id),
            None,
            &format!("moved {} users", moves.len()),
        );
    }
    moves.len() as i64
}

/// `keypool_remove_key`: takes a key out of its pool for good and reassigns its users to the
/// least-loaded remaining keys. Its history is kept. Returns how many users moved.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_remove_key(key_id: Option<i64>) -> i64 {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let Some(key_id) = key_id else {
        errors::null_argument("key_id").raise()
    };
    let cfg = config::current();
    access::key(&cfg, key_id, Privilege::Admin);
    // Known before the removal: afterwards the configuration no longer has the key.
    let removed_slot = cfg.key_by_id(key_id).map(|k| k.slot);
    let pool_name: Option<String> = as_owner(&cfg, |client| {
        let t = errors::spi(client.update(
            "UPDATE keypool.key k SET removed_at = now() FROM keypool.pool p
              WHERE k.id = $1 AND k.removed_at IS NULL AND p.id = k.pool_id RETURNING p.name",
            None,
            &[key_id.into()],
        ));
        rows(t, |r| r.get::<String>(1).ok().flatten())
            .into_iter()
            .next()
            .flatten()
    });
    let Some(pool_name) = pool_name else {
        errors::undefined(format!("key {key_id} does not exist")).raise()
    };
    // This transaction now sees the pool without the key.
    let cfg = config::current();
    let pool = pool_or_error(&cfg, &pool_name);
    let users = users_of_key(&cfg, pool.id, key_id, None);
    let (cfg, targets) = with_pool(&pool_name, |cfg, pool, shares| {
        ensure_tree(sh, cfg, pool, shares)?;
        let mut targets = Vec::with_capacity(users.len());
        for _ in &users {
            let Some(to) = least_loaded(sh, shares) else {
                errors::error(
                    Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("pool \"{pool_name}\" would have no usable key left for its users"),
                )
                .hint("Add another key first, or disable this one instead of removing it.")
                .raise()
            };
            let slot = key_slot_in(cfg, pool, to).unwrap_or(u32::MAX);
            add_assigned(sh, shares, slot, to, 1);
            targets.push((to, slot));
        }
        // Counted again by apply_moves.
        for &(to, slot) in &targets {
            add_assigned(sh, shares, slot, to, -1);
        }
        Ok(targets.into_iter().map(|t| t.0).collect::<Vec<_>>())
    });
    let moves: Vec<(String, u64, i64, i64)> = users
        .into_iter()
        .zip(targets)
        .map(|((u, h), to)| (u, h, key_id, to))
        .collect();
    apply_moves(sh, &pool_name, &moves);
    let pool = pool_or_error(&cfg, &pool_name);
    if let Some(slot) = removed_slot {
        let ks = sh.key(slot);
        if ks.tag.is(cfg.owner, key_id) {
            let before = ks.assigned.swap(0, AcqRel);
            txn::on_abort(move || {
                let ks = sh.key(slot);
                if ks.tag.id() == key_id {
                    ks.assigned.fetch_add(before, AcqRel);
                }
            });
        }
    }
    record_event(
        &cfg,
        "key_removed",
        Some(pool.id),
        Some(key_id),
        &format!("{} users reassigned", moves.len()),
    );
    moves.len() as i64
}

/// `keypool_set_user_weight`: the user's weight in the pool's fair share (tiers: free 1, pro 5
/// ...). Assigns the user first if needed. A share already fixed today keeps until tomorrow.
#[pg_extern(volatile, parallel_unsafe)]
fn keypool_set_user_weight(user_id: Option<&str>, pool: Option<&str>, weight: Option<AnyNumeric>) {
    let _path = privilege::pin_search_path();
    let sh = shmem::shared();
    let user = check_user_id(user_id);
    let Some(pool_name) = pool else {
        errors::null_argument("pool").raise()
    };
    access::pool(&config::current(), pool_name, Privilege::Use);
    let Some(weight) = weight else {
        errors::null_argument("weight").raise()
    };
    let w: f64 = weight.clone().try_into().unwrap_or(f64::NAN);
    if !(w > 0.0 && w <= MAX_WEIGHT as f64) {
        errors::invalid(format!(
            "weight must be greater than 0 and at most {MAX_WEIGHT}, not {weight}"
        ))
        .raise();
    }
    let milli = ((w * WEIGHT_SCALE as f64).round() as i64).max(1);
    let (cfg, _) = assign(user, pool_name);
    let pool = pool_or_error(&cfg, pool_name);
    let hash = members::user_hash(cfg.owner.instance, pool.id, user);
    let stored = member_cache::lookup(&cfg, pool, user);
    let (cfg, (gen, change)) = with_pool(pool_name, |_, pool, shares| {
        let gen = sh.pool(pool.slot).members_gen.load(Acquire);
        let cached = {
            let stripe = sh.members.stripe(hash);
            stripe.find(hash, pool.slot).map(|i| *stripe.at(i))
        };
        let before = before_of(shares, pool, cached.as_ref(), stored.as_ref());
        let class = shares.class_of(milli).unwrap_or_else(|| too_many_weights(&pool.name));
        let change = Change {
            hash,
            was_member: true,
            before_key: before.key_id,
            before_class: before.class,
            after_key: before.key_id,
            after_class: class,
            last_active: before.last_active,
            from_slot: u32::MAX,
            to_slot: u32::MAX,
            key_only: false,
        };
        apply(sh, shares, pool.slot, &change);
        Ok((gen, change))
    });
    let pool = pool_or_error(&cfg, pool_name);
    track(sh, pool.slot, gen, vec![change]);
    as_owner(&cfg, |client| {
        errors::spi(client.update(
            "UPDATE keypool.member SET weight = $3 WHERE pool_id = $1 AND user_id = $2",
            None,
            &[pool.id.into(), user.into(), weight.into()],
        ));
    });
}

fn record_event(cfg: &Config, kind: &str, pool_id: Option<i64>, key_id: Option<i64>, reason: &str) {
    as_owner(cfg, |client| {
        errors::spi(client.update(
            "INSERT INTO keypool.event (at, kind, pool_id, key_id, reason) VALUES ($1, $2, $3, $4, $5)",
            None,
            &[
                clock::to_timestamptz(clock::now_ms()).into(),
                kind.into(),
                pool_id.into(),
                key_id.into(),
                reason.into(),
            ],
        ));
    });
}

#[cfg(test)]
mod tests {
    use super::rebalance_plan;

    #[test]
    fn rebalance_moves_the_fewest_users() {
        // 31 keys with 33 users each and 2 new empty keys: 1023 users over 33 keys = 31 each.
        let mut counts: Vec<(i64, i64)> = (1..=31).map(|k| (k, 33)).collect();
        counts.push((32, 0));
        counts.push((33, 0));
        let plan = rebalance_plan(&counts);
        let give: i64 = plan.iter().filter(|p| p.1 > 0).map(|p| p.1).sum();
        let take: i64 = plan.iter().filter(|p| p.1 < 0).map(|p| -p.1).sum();
        assert_eq!(give, 62);
        assert_eq!(take, 62);
        // Already balanced: nothing moves.
        let plan = rebalance_plan(&[(1, 5), (2, 4), (3, 5)]);
        assert!(plan.iter().all(|p| p.1 == 0), "{plan:?}");
        // Uneven remainder: the fullest keep the extra user.
        let plan = rebalance_plan(&[(1, 10), (2, 0), (3, 1)]);
        assert_eq!(plan.iter().filter(|p| p.1 > 0).map(|p| p.1).sum::<i64>(), 6);
    }
}
