//! Rebalancing a pool after keys were added or removed: how many users each key gives or takes
//! so that the counts differ by at most one, with the fewest moves. Pure.

/// How many users each usable key of the pool should give (positive) or take (negative) so that
/// the counts differ by at most one, with the fewest moves.
pub fn rebalance_plan(counts: &[(i64, i64)]) -> Vec<(i64, i64)> {
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
