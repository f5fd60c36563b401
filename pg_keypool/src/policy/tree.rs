//! The least-loaded key of a pool, in O(log keys): a min segment tree over the pool's usable
//! keys, each leaf holding (users assigned, key id). Ties go to the lowest key id because the
//! id is the low half of the packed value.
//!
//! The tree lives in a region of shared memory owned by the pool (see `engine/key_tree.rs`); these are
//! the pure operations on that region: `cells[1]` is the root, leaves are `cells[n..2n]`.

/// Packs a key's load and id so that comparing packed values compares (users, key id).
pub fn pack(users: i64, key_id: i64) -> u64 {
    ((users.clamp(0, u32::MAX as i64) as u64) << 32) | (key_id as u64 & 0xFFFF_FFFF)
}

pub fn users_of(v: u64) -> i64 {
    (v >> 32) as i64
}

pub fn key_of(v: u64) -> i64 {
    (v & 0xFFFF_FFFF) as i64
}

/// Cells a tree of `n` leaves needs.
pub fn cells_for(n: usize) -> usize {
    2 * n.max(1)
}

/// Builds the tree over `leaves` (packed values, in leaf order) into `cells`.
pub fn build(cells: &mut [u64], leaves: &[u64]) {
    let n = leaves.len();
    if n == 0 {
        return;
    }
    cells[n..2 * n].copy_from_slice(leaves);
    for i in (1..n).rev() {
        cells[i] = cells[2 * i].min(cells[2 * i + 1]);
    }
}

/// Sets leaf `pos` of a tree of `n` leaves and fixes its ancestors.
pub fn update(cells: &mut [u64], n: usize, pos: usize, value: u64) {
    let mut i = n + pos;
    cells[i] = value;
    while i > 1 {
        i /= 2;
        cells[i] = cells[2 * i].min(cells[2 * i + 1]);
    }
}

/// The smallest packed value of a non-empty tree.
pub fn min(cells: &[u64], n: usize) -> Option<u64> {
    (n > 0).then(|| cells[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(loads: &[(i64, i64)]) -> Vec<u64> {
        let leaves: Vec<u64> = loads.iter().map(|&(u, k)| pack(u, k)).collect();
        let mut cells = vec![0u64; cells_for(leaves.len())];
        build(&mut cells, &leaves);
        cells
    }

    #[test]
    fn least_loaded_then_lowest_id() {
        let cells = tree(&[(3, 10), (1, 12), (1, 11), (2, 13)]);
        let m = min(&cells, 4).unwrap();
        assert_eq!((users_of(m), key_of(m)), (1, 11));
    }

    #[test]
    fn assigning_round_robins_a_fresh_pool_and_stays_within_one() {
        // 31 keys of non-consecutive ids, 1000 users: every key ends with 32 or 33.
        let ids: Vec<i64> = (0..31).map(|i| 100 + 7 * i).collect();
        let mut loads: Vec<i64> = vec![0; ids.len()];
        let leaves: Vec<u64> = ids.iter().map(|&k| pack(0, k)).collect();
        let mut cells = vec![0u64; cells_for(ids.len())];
        build(&mut cells, &leaves);
        for _ in 0..1000 {
            let m = min(&cells, ids.len()).unwrap();
            let pos = ids.iter().position(|&k| k == key_of(m)).unwrap();
            loads[pos] += 1;
            update(&mut cells, ids.len(), pos, pack(loads[pos], ids[pos]));
        }
        assert!(loads.iter().all(|&l| l == 32 || l == 33), "{loads:?}");
        // The first 1000 - 31*32 = 8 keys (lowest ids) got the extra user.
        assert!(loads[..8].iter().all(|&l| l == 33));
    }

    #[test]
    fn a_new_empty_key_takes_every_new_user_until_level() {
        let mut cells = tree(&[(5, 1), (5, 2), (0, 3)]);
        for expected in 1..=5 {
            let m = min(&cells, 3).unwrap();
            assert_eq!(key_of(m), 3);
            update(&mut cells, 3, 2, pack(expected, 3));
        }
        assert_eq!(key_of(min(&cells, 3).unwrap()), 1);
    }

    #[test]
    fn single_leaf_and_empty() {
        let cells = tree(&[(7, 42)]);
        assert_eq!(key_of(min(&cells, 1).unwrap()), 42);
        assert_eq!(min(&[0, 0], 0), None);
    }
}
