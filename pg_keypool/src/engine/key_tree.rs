//! The least-loaded key of a pool in shared memory: each pool's segment tree (policy/tree.rs) in
//! an arena of shared memory, rebuilt when the pool's usable keys change, and each key's count of
//! assigned members.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};

use crate::catalog::model::{Config, Key, Pool};
use crate::errors::{self, Code};
use crate::policy::shares::{PoolShares, TreeMeta};
use crate::policy::tree;
use crate::state::shmem::Shared;

/// The tree was built from a newer configuration than this backend's: reload and retry.
pub struct Stale;

/// Keys that take new users: the usable keys of the best priority, in id order.
pub fn tree_keys<'c>(cfg: &'c Config, pool: &'c Pool) -> Vec<&'c Key> {
    cfg.assignable(pool).collect()
}

#[allow(clippy::mut_from_ref)]
pub fn cells<'a>(sh: &'a Shared, meta: &TreeMeta) -> &'a mut [u64] {
    // SAFETY: the region belongs to one pool and is only touched under that pool's lock.
    unsafe { std::slice::from_raw_parts_mut(sh.tree_cells[meta.base as usize].0.get(), meta.cap as usize) }
}

/// Makes sure the pool's tree matches this backend's view of its keys.
pub fn ensure_tree(sh: &'static Shared, cfg: &Config, pool: &Pool, shares: &mut PoolShares) -> Result<(), Stale> {
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
pub fn add_assigned(sh: &Shared, shares: &PoolShares, key_slot: u32, key_id: i64, delta: i64) {
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

pub fn least_loaded(sh: &Shared, shares: &PoolShares) -> Option<i64> {
    let t = shares.tree;
    tree::min(cells(sh, &t), t.n as usize).map(tree::key_of)
}

/// The key's slot, if the key belongs to `pool` in this configuration.
pub fn key_slot_in(cfg: &Config, pool: &Pool, key_id: i64) -> Option<u32> {
    cfg.key_by_id(key_id).filter(|k| k.pool_id == pool.id).map(|k| k.slot)
}
