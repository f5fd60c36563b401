//! Fair daily shares of a pool's capacity: pure arithmetic over per-pool aggregates.
//!
//! A pool's daily capacity C is the sum of requests per day over its usable scopes. A user's
//! share is `max(min_share, floor(C * weight / W))`, where W is the total weight of the pool's
//! counted users: its members, or, with an activity window of D days, the members active on one
//! of the last D days (today included). Nothing here is O(users): members are counted per weight
//! class (at most [`MAX_CLASSES`] distinct weights per pool), and per class by the day they were
//! last active (a ring of [`RING_DAYS`] days).
//!
//! A user's share is fixed at their first reservation of the day, so the numbers a user sees do
//! not move under them during the day. Users who join later get shares computed with the larger
//! W; if minimum shares add up to more than C, the pool is overcommitted and shares are honoured
//! until the scopes themselves refuse.
//!
//! Users who reserve without being members of the pool (guests) get the share they would have
//! as one more member, but are not counted: they do not shrink the members' shares, and their
//! share is not promised to them.
//!
//! Borrowing (when the pool allows it): a user past their share may take one more request only
//! if the pool still has capacity that is neither used nor promised to a counted user's share:
//! `C - sum over counted users of max(used, share) >= 1`. Users active today contribute their
//! fixed share plus whatever they borrowed; counted users not yet active today contribute the
//! share they would get now. So borrowing never takes what another user's remaining share needs.

/// Distinct weights (tiers) a pool can have.
pub const MAX_CLASSES: usize = 16;
/// Days of activity kept per class: windows of up to `RING_DAYS - 2` days.
pub const RING_DAYS: usize = 92;
pub const MAX_WINDOW_DAYS: i32 = 90;
/// Weights are kept in thousandths.
pub const WEIGHT_SCALE: i64 = 1000;
/// "Never active", or "no day yet".
pub const NEVER: i32 = i32::MIN;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WeightClass {
    pub weight_milli: i64,
    pub members: i64,
    /// Members whose last active day is d, at index d % RING_DAYS, for d in the ring.
    pub by_day: [i32; RING_DAYS],
}

impl Default for WeightClass {
    fn default() -> Self {
        WeightClass {
            weight_milli: 0,
            members: 0,
            by_day: [0; RING_DAYS],
        }
    }
}

/// Where the tree of a pool's keys lives in the arena (engine/key_tree.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeMeta {
    pub base: u32,
    pub cap: u32,
    pub n: u32,
    /// Which build the key slots' tree positions belong to (0: not built).
    pub build: u64,
    /// The configuration generation it was built from, and a fingerprint of the keys it holds
    /// (a transaction sees its own uncommitted key changes under the same generation).
    pub generation: u64,
    pub fingerprint: u64,
}

/// Per-pool aggregates, guarded by the pool slot's lock.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PoolShares {
    pub n_classes: u32,
    /// Newest day whose ring bucket is current.
    pub ring_day: i32,
    pub classes: [WeightClass; MAX_CLASSES],
    /// The day the following sums are for.
    pub day: i32,
    /// Sum of the fixed shares of users active on `day`.
    pub active_shares: u64,
    /// Requests granted beyond a user's share on `day`.
    pub borrowed: u64,
    pub tree: TreeMeta,
}

impl Default for PoolShares {
    fn default() -> Self {
        PoolShares {
            n_classes: 0,
            ring_day: NEVER,
            classes: [WeightClass::default(); MAX_CLASSES],
            day: NEVER,
            active_shares: 0,
            borrowed: 0,
            tree: TreeMeta::default(),
        }
    }
}

/// How a pool shares its capacity (from its configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Requests per day over the usable scopes; `None` when some scope has no daily limit.
    pub capacity: Option<u64>,
    pub min_share: u64,
    /// Activity window in days; `None`: every member counts.
    pub window_days: Option<i32>,
    pub borrowing: bool,
}

fn ring(day: i32) -> usize {
    day.rem_euclid(RING_DAYS as i32) as usize
}

impl PoolShares {
    /// The class of a weight, created if new; `None` when the pool already has MAX_CLASSES.
    pub fn class_of(&mut self, weight_milli: i64) -> Option<u16> {
        let n = self.n_classes as usize;
        if let Some(i) = self.classes[..n].iter().position(|c| c.weight_milli == weight_milli) {
            return Some(i as u16);
        }
        // Reuse an empty class before taking a new one.
        if let Some(i) = self.classes[..n].iter().position(|c| c.members == 0) {
            self.classes[i] = WeightClass {
                weight_milli,
                ..Default::default()
            };
            return Some(i as u16);
        }
        if n == MAX_CLASSES {
            return None;
        }
        self.classes[n] = WeightClass {
            weight_milli,
            ..Default::default()
        };
        self.n_classes += 1;
        Some(n as u16)
    }

    /// Moves the ring forward to `today`, clearing days that fall out of it.
    pub fn roll(&mut self, today: i32) {
        if self.ring_day == NEVER || today - self.ring_day >= RING_DAYS as i32 {
            for c in &mut self.classes[..self.n_classes as usize] {
                c.by_day = [0; RING_DAYS];
            }
        } else {
            for d in self.ring_day + 1..=today {
                for c in &mut self.classes[..self.n_classes as usize] {
                    c.by_day[ring(d)] = 0;
                }
            }
        }
        if self.ring_day == NEVER || today > self.ring_day {
            self.ring_day = today;
        }
        if self.day != today {
            self.day = today;
            self.active_shares = 0;
            self.borrowed = 0;
        }
    }

    /// Whether day `d` still has its bucket in the ring (as of `ring_day`).
    fn in_ring(&self, d: i32) -> bool {
        d != NEVER && d <= self.ring_day && self.ring_day - d < RING_DAYS as i32
    }

    /// Adds a member of class `class`, last active on `last_active` (or NEVER).
    pub fn add_member(&mut self, class: u16, last_active: i32) {
        let in_ring = self.in_ring(last_active);
        let c = &mut self.classes[class as usize];
        c.members += 1;
        if in_ring {
            c.by_day[ring(last_active)] += 1;
        }
    }

    /// Adds `n` members of class `class`, last active on `last_active` (or NEVER).
    pub fn add_members(&mut self, class: u16, last_active: i32, n: i64) {
        let in_ring = self.in_ring(last_active);
        let c = &mut self.classes[class as usize];
        c.members += n;
        if in_ring {
            c.by_day[ring(last_active)] += n as i32;
        }
    }

    pub fn remove_member(&mut self, class: u16, last_active: i32) {
        let in_ring = self.in_ring(last_active);
        let c = &mut self.classes[class as usize];
        c.members -= 1;
        if in_ring {
            c.by_day[ring(last_active)] -= 1;
        }
    }

    /// Records that a member last active on `from` is active on `today` (call `roll` first).
    pub fn touch(&mut self, class: u16, from: i32, today: i32) {
        if from == today {
            return;
        }
        let in_ring = self.in_ring(from);
        let c = &mut self.classes[class as usize];
        if in_ring {
            c.by_day[ring(from)] -= 1;
        }
        c.by_day[ring(today)] += 1;
    }

    /// Members of `class` counted today, and of those, how many were active today.
    fn counted(&self, class: usize, today: i32, window: Option<i32>) -> (i64, i64) {
        let c = &self.classes[class];
        let active_today = if self.ring_day == today {
            c.by_day[ring(today)] as i64
        } else {
            0
        };
        let counted = match window {
            None => c.members,
            Some(d) => (0..d.min(MAX_WINDOW_DAYS))
                .map(|back| today - back)
                .filter(|&day| self.in_ring(day))
                .map(|day| c.by_day[ring(day)] as i64)
                .sum(),
        };
        (counted, active_today)
    }

    /// Total weight (thousandths) of the counted users.
    pub fn counted_weight(&self, today: i32, window: Option<i32>) -> i64 {
        (0..self.n_classes as usize)
            .map(|i| self.classes[i].weight_milli * self.counted(i, today, window).0)
            .sum()
    }

    /// The share of a user of `weight_milli` today, given the counted weight `w_total` (which
    /// must include that user's weight if they are counted). `None` when capacity is unlimited.
    pub fn share(policy: &Policy, weight_milli: i64, w_total: i64) -> Option<u64> {
        let capacity = policy.capacity?;
        let proportional = if w_total <= 0 {
            capacity
        } else {
            ((capacity as u128 * weight_milli.max(0) as u128) / w_total as u128) as u64
        };
        Some(proportional.max(policy.min_share))
    }

    /// Sum of the shares every counted user holds or would get today: fixed shares of those
    /// already active plus what the others would get now.
    pub fn promised(&self, policy: &Policy, today: i32) -> u64 {
        let w_total = self.counted_weight(today, policy.window_days);
        let inactive: u64 = (0..self.n_classes as usize)
            .map(|i| {
                let (counted, active) = self.counted(i, today, policy.window_days);
                let waiting = (counted - active).max(0) as u64;
                let share = Self::share(policy, self.classes[i].weight_milli, w_total).unwrap_or(0);
                waiting.saturating_mul(share)
            })
            .fold(0u64, u64::saturating_add);
        let active = if self.day == today { self.active_shares } else { 0 };
        active.saturating_add(inactive)
    }

    /// Requests that may be lent beyond shares right now (see the module comment).
    pub fn lendable(&self, policy: &Policy, today: i32) -> u64 {
        let Some(capacity) = policy.capacity else {
            return u64::MAX;
        };
        let borrowed = if self.day == today { self.borrowed } else { 0 };
        capacity.saturating_sub(self.promised(policy, today).saturating_add(borrowed))
    }

    /// Sum of shares over capacity: above 1.0 the pool is overcommitted.
    pub fn overcommit(&self, policy: &Policy, today: i32) -> Option<f64> {
        let capacity = policy.capacity?;
        (capacity > 0).then(|| self.promised(policy, today) as f64 / capacity as f64)
    }
}

/// Users counted today (with a window: active within it).
pub fn counted_users(shares: &PoolShares, today: i32, window: Option<i32>) -> i64 {
    (0..shares.n_classes as usize)
        .map(|i| shares.counted(i, today, window).0)
        .sum()
}

/// How close a user is to their share: 'ok', 'low' (under 20 % left), 'critical' (under 5 %),
/// 'exhausted'.
pub fn warning_level(remaining: u64, allocated: u64) -> &'static str {
    if remaining == 0 {
        "exhausted"
    } else if remaining * 20 < allocated {
        "critical"
    } else if remaining * 5 < allocated {
        "low"
    } else {
        "ok"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i32 = 20_000;

    fn policy(capacity: u64, min_share: u64) -> Policy {
        Policy {
            capacity: Some(capacity),
            min_share,
            window_days: None,
            borrowing: false,
        }
    }

    fn pool_with(members: &[(i64, i64)]) -> PoolShares {
        // (weight_milli, count)
        let mut p = PoolShares::default();
        p.roll(DAY);
        for &(w, n) in members {
            let c = p.class_of(w).unwrap();
            for _ in 0..n {
                p.add_member(c, NEVER);
            }
        }
        p
    }

    #[test]
    fn seed_000_table() {
        // 15 keys x 200 requests per day, minimum 30.
        let pol = policy(3000, 30);
        for (users, share) in [(1, 3000), (10, 300), (50, 60), (100, 30), (200, 30)] {
            let p = pool_with(&[(WEIGHT_SCALE, users)]);
            let w = p.counted_weight(DAY, None);
            assert_eq!(PoolShares::share(&pol, WEIGHT_SCALE, w), Some(share), "{users} users");
        }
        // 200 users x 30 = 6000 promised: twice the capacity.
        let p = pool_with(&[(WEIGHT_SCALE, 200)]);
        assert_eq!(p.overcommit(&pol, DAY), Some(2.0));
        let p = pool_with(&[(WEIGHT_SCALE, 100)]);
        assert_eq!(p.overcommit(&pol, DAY), Some(1.0));
    }

    #[test]
    fn tiers_get_shares_by_weight() {
        // 8 free users (weight 1) and 2 pro users (weight 4): W = 16.
        let p = pool_with(&[(WEIGHT_SCALE, 8), (4 * WEIGHT_SCALE, 2)]);
        let w = p.counted_weight(DAY, None);
        assert_eq!(w, 16 * WEIGHT_SCALE);
        let pol = policy(1600, 0);
        assert_eq!(PoolShares::share(&pol, WEIGHT_SCALE, w), Some(100));
        assert_eq!(PoolShares::share(&pol, 4 * WEIGHT_SCALE, w), Some(400));
    }

    #[test]
    fn activity_window_counts_only_recent_members() {
        let mut p = PoolShares::default();
        p.roll(DAY - 10);
        let c = p.class_of(WEIGHT_SCALE).unwrap();
        for _ in 0..6 {
            p.add_member(c, NEVER);
        }
        // Two were active 10 days ago, one 3 days ago, one today.
        p.touch(c, NEVER, DAY - 10);
        p.touch(c, NEVER, DAY - 10);
        p.roll(DAY - 3);
        p.touch(c, NEVER, DAY - 3);
        p.roll(DAY);
        p.touch(c, NEVER, DAY);
        assert_eq!(p.counted_weight(DAY, Some(7)), 2 * WEIGHT_SCALE);
        assert_eq!(p.counted_weight(DAY, Some(14)), 4 * WEIGHT_SCALE);
        assert_eq!(p.counted_weight(DAY, None), 6 * WEIGHT_SCALE);
        // After the ring wraps around, old activity is forgotten, members are not.
        p.roll(DAY + 200);
        assert_eq!(p.counted_weight(DAY + 200, Some(90)), 0);
        assert_eq!(p.counted_weight(DAY + 200, None), 6 * WEIGHT_SCALE);
    }

    #[test]
    fn lending_never_touches_promised_shares() {
        // Capacity 100, 4 members: share 25 each.
        let pol = Policy {
            borrowing: true,
            ..policy(100, 0)
        };
        let mut p = pool_with(&[(WEIGHT_SCALE, 4)]);
        assert_eq!(p.lendable(&pol, DAY), 0);
        // One member becomes active with share 25: still everything promised.
        p.touch(0, NEVER, DAY);
        p.active_shares += 25;
        assert_eq!(p.lendable(&pol, DAY), 0);
        // With 3 members and 100 capacity, floor(100/3) = 33: one request is spare.
        let p = pool_with(&[(WEIGHT_SCALE, 3)]);
        assert_eq!(p.lendable(&pol, DAY), 1);
    }

    #[test]
    fn lending_with_an_activity_window_uses_what_inactive_members_leave() {
        // 10 members, only 2 active within the window: they share all of it.
        let pol = Policy {
            window_days: Some(7),
            borrowing: true,
            ..policy(100, 0)
        };
        let mut p = PoolShares::default();
        p.roll(DAY);
        let c = p.class_of(WEIGHT_SCALE).unwrap();
        for _ in 0..10 {
            p.add_member(c, NEVER);
        }
        p.touch(c, NEVER, DAY);
        p.touch(c, NEVER, DAY);
        let w = p.counted_weight(DAY, pol.window_days);
        assert_eq!(PoolShares::share(&pol, WEIGHT_SCALE, w), Some(50));
        p.active_shares = 100;
        assert_eq!(p.lendable(&pol, DAY), 0);
        p.borrowed = 1;
        assert_eq!(p.lendable(&pol, DAY), 0);
    }

    #[test]
    fn a_new_day_starts_fresh() {
        let pol = Policy {
            borrowing: true,
            ..policy(100, 0)
        };
        let mut p = pool_with(&[(WEIGHT_SCALE, 3)]);
        p.active_shares = 99;
        p.borrowed = 1;
        assert_eq!(p.lendable(&pol, DAY), 0);
        p.roll(DAY + 1);
        assert_eq!(p.lendable(&pol, DAY + 1), 1);
    }

    #[test]
    fn classes_are_limited_and_reused() {
        let mut p = PoolShares::default();
        for w in 1..=MAX_CLASSES as i64 {
            let c = p.class_of(w).unwrap();
            p.add_member(c, NEVER);
        }
        assert_eq!(p.class_of(999), None);
        p.remove_member(3, NEVER);
        assert_eq!(p.class_of(999), Some(3));
    }

    #[test]
    fn warning_levels() {
        assert_eq!(warning_level(100, 100), "ok");
        assert_eq!(warning_level(20, 100), "ok");
        assert_eq!(warning_level(19, 100), "low");
        assert_eq!(warning_level(5, 100), "low");
        assert_eq!(warning_level(4, 100), "critical");
        assert_eq!(warning_level(0, 100), "exhausted");
        assert_eq!(warning_level(1, 30), "critical");
    }

    #[test]
    fn unlimited_capacity_has_no_share() {
        let pol = Policy {
            capacity: None,
            min_share: 30,
            window_days: None,
            borrowing: false,
        };
        assert_eq!(PoolShares::share(&pol, WEIGHT_SCALE, 5), None);
    }
}
