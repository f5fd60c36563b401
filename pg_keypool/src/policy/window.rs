//! Rate windows of a quota scope: a rolling per-minute log and a calendar-day counter.
//!
//! Pure data and arithmetic, no PostgreSQL: the structs here live inside shared-memory scope
//! slots (see `scope.rs`), are always accessed under that slot's lock, and are unit-tested on
//! their own.
//!
//! ## Rolling minute window
//! A grant charged at time `t` counts against the per-minute limits for every instant in
//! `[t, t + 60 s)`. The log keeps one entry per distinct millisecond that was charged, so the
//! window is exact: no double burst across a minute boundary, and the retry time we report is the
//! exact millisecond at which enough old charges leave the window.
//!
//! The log is bounded ([`LOG_CAPACITY`] entries). When it is full, a charge in the newest entry's
//! bucket joins that entry (which takes the charge's time); otherwise the two adjacent entries
//! closest in time within a bucket are merged and the merged entry takes the *later* timestamp. A charge then
//! stays in the window slightly longer than it needs to, never shorter, so the bound degrades
//! towards refusing a little early and never towards over-granting.

/// Length of the rolling window, in milliseconds.
pub const WINDOW_MS: i64 = 60_000;

/// Entries kept per minute log of a scope before adjacent entries are merged.
pub const LOG_CAPACITY: usize = 64;
/// Entries kept per minute log of a caller (a user of a pool, state/callers.rs): few, since
/// every user granted in a minute holds one (merged within 8.6 s).
pub const CALLER_LOG_CAPACITY: usize = 11;

/// Adjacent entries of a log of `n` entries are merged only within one bucket of this width
/// (see `Log::merge_closest_pair`): a window holds at most `n - 3` buckets (61 of a second for
/// 64 entries, 8 of 8.6 seconds for 11), fewer than the log's entries.
const fn merge_bucket_ms(n: usize) -> i64 {
    let buckets = n as i64 - 4;
    assert!(n <= u16::MAX as usize);
    (WINDOW_MS + buckets - 1) / buckets
}

/// The four limits of a quota scope. `0` means "no limit" (SQL NULL); limits are always > 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: u64,
    pub rpd: u64,
    pub tpm: u64,
    pub tpd: u64,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.rpm == 0 && self.rpd == 0 && self.tpm == 0 && self.tpd == 0
    }
}

/// What was charged at one time: 16 bytes, so that a caller's log is small (the caller table
/// holds one per user granted in the last minute, touched at random).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// Milliseconds after the log's `base_ms`.
    at: u32,
    /// Saturates (as a whole minute of one scope never holds 2^32 requests); the log's sums
    /// then stay above what the entries hold until the log is empty: too much, never too little.
    requests: u32,
    tokens: u64,
}

/// A bounded log of what was charged in the last minute, of `N` entries.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Log<const N: usize> {
    head: u16,
    len: u16,
    /// The time entries count from: set when the log is empty, moved on before an entry would
    /// lie 2^32 ms (49 days) after it.
    base_ms: i64,
    sum_requests: u64,
    sum_tokens: u64,
    entries: [Entry; N],
}

/// A scope's log.
pub type MinuteLog = Log<LOG_CAPACITY>;
/// A caller's log: fewer entries, merged within 8.6 seconds.
pub type CallerLog = Log<CALLER_LOG_CAPACITY>;

impl<const N: usize> Default for Log<N> {
    fn default() -> Self {
        Log {
            head: 0,
            len: 0,
            base_ms: 0,
            sum_requests: 0,
            sum_tokens: 0,
            entries: [Entry::default(); N],
        }
    }
}

/// How long until a charge fits, or that it never can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Retry after this many milliseconds (always >= 1).
    Ms(i64),
    /// The charge is larger than the limit itself.
    Never,
}

impl Wait {
    /// The later of two waits.
    pub fn max(self, other: Wait) -> Wait {
        match (self, other) {
            (Wait::Never, _) | (_, Wait::Never) => Wait::Never,
            (Wait::Ms(a), Wait::Ms(b)) => Wait::Ms(a.max(b)),
        }
    }

    /// The earlier of two waits.
    pub fn min(self, other: Wait) -> Wait {
        match (self, other) {
            (Wait::Never, w) | (w, Wait::Never) => w,
            (Wait::Ms(a), Wait::Ms(b)) => Wait::Ms(a.min(b)),
        }
    }
}

impl<const N: usize> Log<N> {
    const MERGE_BUCKET_MS: i64 = merge_bucket_ms(N);

    fn slot(&self, i: usize) -> usize {
        (self.head as usize + i) % N
    }

    fn get(&self, i: usize) -> &Entry {
        &self.entries[self.slot(i)]
    }

    /// When entry `i` was charged.
    fn at_ms(&self, i: usize) -> i64 {
        self.base_ms + i64::from(self.get(i).at)
    }

    /// The offset of `at_ms` from the base, moving the base on if need be; `at_ms` is not
    /// earlier than any entry.
    fn offset_of(&mut self, at_ms: i64) -> u32 {
        if self.len == 0 {
            self.base_ms = at_ms;
        } else if at_ms - self.base_ms > i64::from(u32::MAX) {
            // Entries older than a minute no longer count; those left lie within a minute of
            // `at_ms`, so they fit after the oldest becomes the base.
            self.expire(at_ms);
            let shift = match self.len {
                0 => at_ms - self.base_ms,
                _ => i64::from(self.get(0).at),
            };
            self.base_ms += shift;
            for i in 0..self.len as usize {
                let s = self.slot(i);
                self.entries[s].at -= shift as u32;
            }
        }
        (at_ms - self.base_ms) as u32
    }

    pub fn requests(&self) -> u64 {
        self.sum_requests
    }

    pub fn tokens(&self) -> u64 {
        self.sum_tokens
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// When the newest charge in the log was made.
    pub fn newest_ms(&self) -> Option<i64> {
        (self.len > 0).then(|| self.at_ms(self.len as usize - 1))
    }

    /// Drops the entries that have left the window at `now_ms`.
    pub fn expire(&mut self, now_ms: i64) {
        while self.len > 0 {
            if self.at_ms(0) + WINDOW_MS > now_ms {
                break;
            }
            let e = *self.get(0);
            self.sum_requests = self.sum_requests.saturating_sub(u64::from(e.requests));
            self.sum_tokens = self.sum_tokens.saturating_sub(e.tokens);
            self.head = ((self.head as usize + 1) % N) as u16;
            self.len -= 1;
        }
        if self.len == 0 {
            // What saturated entries could not hold is gone with them.
            self.sum_requests = 0;
            self.sum_tokens = 0;
        }
    }

    /// How long until `requests` and `tokens` more fit under `rpm` / `tpm` (0 = unlimited), or
    /// `None` if they fit now. Call [`MinuteLog::expire`] first.
    pub fn wait_for(&self, now_ms: i64, requests: u64, tokens: u64, rpm: u64, tpm: u64) -> Option<Wait> {
        let mut wait: Option<Wait> = None;
        if rpm > 0 && self.sum_requests + requests > rpm {
            let w = if requests > rpm {
                Wait::Never
            } else {
                self.wait_to_free(now_ms, self.sum_requests + requests - rpm, |e| u64::from(e.requests))
            };
            wait = Some(w);
        }
        if tpm > 0 && self.sum_tokens.saturating_add(tokens) > tpm {
            let w = if tokens > tpm {
                Wait::Never
            } else {
                self.wait_to_free(now_ms, self.sum_tokens + tokens - tpm, |e| e.tokens)
            };
            wait = Some(wait.map_or(w, |x| x.max(w)));
        }
        wait
    }

    fn wait_to_free(&self, now_ms: i64, needed: u64, amount: impl Fn(&Entry) -> u64) -> Wait {
        let mut freed = 0u64;
        for i in 0..self.len as usize {
            freed += amount(self.get(i));
            if freed >= needed {
                return Wait::Ms((self.at_ms(i) + WINDOW_MS - now_ms).max(1));
            }
        }
        // Only reachable when the charges were adjusted below what they once were (or entries
        // saturated); the whole window frees up with its newest entry.
        match self.len {
            0 => Wait::Ms(1),
            n => Wait::Ms((self.at_ms(n as usize - 1) + WINDOW_MS - now_ms).max(1)),
        }
    }

    /// Records a charge at `now_ms`. Charges must be recorded in non-decreasing time order;
    /// a charge older than the newest entry is recorded at the newest entry's time (later, so
    /// conservative).
    pub fn charge(&mut self, now_ms: i64, requests: u64, tokens: u64) {
        let requests32 = u32::try_from(requests).unwrap_or(u32::MAX);
        if self.newest_ms().is_some_and(|newest| newest >= now_ms) {
            let last = self.slot(self.len as usize - 1);
            self.add_to(last, requests32, tokens);
        } else if self.len as usize == N
            && self.at_ms(N - 1).div_euclid(Self::MERGE_BUCKET_MS) == now_ms.div_euclid(Self::MERGE_BUCKET_MS)
        {
            // A full log under load: the newest entry, when in the same bucket as this charge,
            // takes it (moved later within its bucket, as a merge would); the search for the
            // closest pair runs at most once per bucket.
            let at = self.offset_of(now_ms);
            // Still the newest entry: it is within a bucket of `now_ms`, so it did not expire.
            let last = self.slot(self.len as usize - 1);
            self.entries[last].at = at;
            self.add_to(last, requests32, tokens);
        } else {
            if self.len as usize == N {
                self.merge_closest_pair();
            }
            let at = self.offset_of(now_ms);
            let s = self.slot(self.len as usize);
            self.entries[s] = Entry {
                at,
                requests: requests32,
                tokens,
            };
            self.len += 1;
        }
        // After the entry: moving the base may expire entries (and their sums).
        self.sum_requests = self.sum_requests.saturating_add(requests);
        self.sum_tokens = self.sum_tokens.saturating_add(tokens);
    }

    fn add_to(&mut self, slot: usize, requests: u32, tokens: u64) {
        let e = &mut self.entries[slot];
        e.requests = e.requests.saturating_add(requests);
        e.tokens = e.tokens.saturating_add(tokens);
    }

    /// Merges the two adjacent entries closest in time within one `MERGE_BUCKET_MS` bucket; the
    /// merged entry keeps the later time. Merging only within a bucket bounds how much later any
    /// charge is recorded than it happened (less than one bucket, so at most 1/60 of a window's
    /// capacity is held back under sustained load): merging across buckets again and again would
    /// carry charges ever later, and a saturated key would get a fraction of its limit. A full
    /// log after `expire` spans at most 61 buckets, so such a pair exists; otherwise the closest
    /// pair anywhere is merged (still conservative).
    fn merge_closest_pair(&mut self) {
        let n = self.len as usize;
        debug_assert!(n >= 2);
        let mut best = None;
        let mut best_gap = i64::MAX;
        let mut closest = 0usize;
        let mut closest_gap = i64::MAX;
        for i in 0..n - 1 {
            let (a, b) = (self.at_ms(i), self.at_ms(i + 1));
            let gap = b - a;
            if gap < closest_gap {
                closest_gap = gap;
                closest = i;
            }
            let bucket = Self::MERGE_BUCKET_MS;
            if a.div_euclid(bucket) == b.div_euclid(bucket) && gap < best_gap {
                best_gap = gap;
                best = Some(i);
            }
        }
        let best = best.unwrap_or(closest);
        let (a, b) = (self.slot(best), self.slot(best + 1));
        let (requests, tokens) = (self.entries[a].requests, self.entries[a].tokens);
        self.add_to(b, requests, tokens);
        // Shift the entries before `best` one place towards the newer end, then drop the head.
        for i in (0..best).rev() {
            let (from, to) = (self.slot(i), self.slot(i + 1));
            self.entries[to] = self.entries[from];
        }
        self.head = ((self.head as usize + 1) % N) as u16;
        self.len -= 1;
    }

    /// Changes what was charged at `at_ms` by the given (possibly negative) amounts: a refund
    /// or an overrun settled after the fact. Nothing happens if that charge already left the
    /// window. Amounts never go below zero.
    pub fn adjust(&mut self, now_ms: i64, at_ms: i64, requests: i64, tokens: i64) {
        self.expire(now_ms);
        if at_ms + WINDOW_MS <= now_ms {
            return;
        }
        let Some(i) = (0..self.len as usize).find(|&i| self.at_ms(i) >= at_ms) else {
            return;
        };
        let s = self.slot(i);
        let e = &mut self.entries[s];
        let new_req = add_signed(u64::from(e.requests), requests).min(u64::from(u32::MAX));
        let new_tok = add_signed(e.tokens, tokens);
        self.sum_requests = add_signed(self.sum_requests, new_req as i64 - i64::from(e.requests));
        self.sum_tokens = self.sum_tokens.saturating_sub(e.tokens).saturating_add(new_tok);
        e.requests = new_req as u32;
        e.tokens = new_tok;
    }

    /// Fills the window to the given limits from `now_ms` on: used after a crash, when what was
    /// granted since the last saved state is unknown.
    pub fn fill_to(&mut self, now_ms: i64, rpm: u64, tpm: u64) {
        self.expire(now_ms);
        let requests = rpm.saturating_sub(self.sum_requests);
        let tokens = tpm.saturating_sub(self.sum_tokens);
        if requests > 0 || tokens > 0 {
            self.charge(now_ms, requests, tokens);
        }
    }
}

fn add_signed(v: u64, d: i64) -> u64 {
    if d >= 0 {
        v.saturating_add(d as u64)
    } else {
        v.saturating_sub(d.unsigned_abs())
    }
}

/// Usage of the scope's current calendar day (in the scope's time zone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayWindow {
    /// First instant of the day, UTC milliseconds (0 = not started yet).
    pub start_ms: i64,
    /// First instant of the next day, UTC milliseconds.
    pub end_ms: i64,
    pub requests: u64,
    pub tokens: u64,
    /// Usage assumed after a crash for a day that had not started when the state was saved:
    /// applied when the window rolls into a day that began before `carry_until_ms`.
    pub carry_requests: u64,
    pub carry_tokens: u64,
    pub carry_until_ms: i64,
}

impl DayWindow {
    /// Moves to the day containing `now_ms` if it is not the current one; `bounds` gives that
    /// day's (start, end).
    pub fn roll(&mut self, now_ms: i64, bounds: impl FnOnce(i64) -> (i64, i64)) {
        if self.start_ms == 0 || now_ms >= self.end_ms || now_ms < self.start_ms {
            let (start, end) = bounds(now_ms);
            let carried = start < self.carry_until_ms;
            *self = DayWindow {
                start_ms: start,
                end_ms: end,
                requests: if carried { self.carry_requests } else { 0 },
                tokens: if carried { self.carry_tokens } else { 0 },
                ..Default::default()
            };
        }
    }

    pub fn wait_for(&self, now_ms: i64, requests: u64, tokens: u64, rpd: u64, tpd: u64) -> Option<Wait> {
        let mut wait = None;
        let until_reset = Wait::Ms((self.end_ms - now_ms).max(1));
        if rpd > 0 && self.requests + requests > rpd {
            wait = Some(if requests > rpd { Wait::Never } else { until_reset });
        }
        if tpd > 0 && self.tokens.saturating_add(tokens) > tpd {
            let w = if tokens > tpd { Wait::Never } else { until_reset };
            wait = Some(wait.map_or(w, |x: Wait| x.max(w)));
        }
        wait
    }

    pub fn adjust(&mut self, requests: i64, tokens: i64) {
        self.requests = add_signed(self.requests, requests);
        self.tokens = add_signed(self.tokens, tokens);
    }
}

/// Both windows of a scope and its limits: the state a scope slot protects with its lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ScopeWindows {
    pub limits: Limits,
    /// The configuration generation the limits were loaded from; an older cache never
    /// overwrites newer limits.
    pub generation: u64,
    pub minute: MinuteLog,
    pub day: DayWindow,
}

/// Where a charge landed, so that it can be adjusted later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    pub at_ms: i64,
    pub day_start_ms: i64,
}

impl ScopeWindows {
    /// Charges one request and `tokens` if every limit allows it, or says how long to wait.
    pub fn try_charge(
        &mut self,
        now_ms: i64,
        tokens: u64,
        day_bounds: impl FnOnce(i64) -> (i64, i64),
    ) -> Result<Charge, Wait> {
        self.minute.expire(now_ms);
        self.day.roll(now_ms, day_bounds);
        let l = self.limits;
        let minute = self.minute.wait_for(now_ms, 1, tokens, l.rpm, l.tpm);
        let day = self.day.wait_for(now_ms, 1, tokens, l.rpd, l.tpd);
        match (minute, day) {
            (None, None) => {
                self.minute.charge(now_ms, 1, tokens);
                self.day.requests += 1;
                self.day.tokens += tokens;
                Ok(Charge {
                    at_ms: now_ms,
                    day_start_ms: self.day.start_ms,
                })
            }
            (Some(w), None) | (None, Some(w)) => Err(w),
            (Some(a), Some(b)) => Err(a.max(b)),
        }
    }

    /// How long until one request with `tokens` would fit, without charging anything.
    pub fn wait_for(&self, now_ms: i64, tokens: u64) -> Option<Wait> {
        let mut minute = self.minute;
        minute.expire(now_ms);
        let l = self.limits;
        let m = minute.wait_for(now_ms, 1, tokens, l.rpm, l.tpm);
        let d = if now_ms >= self.day.end_ms || now_ms < self.day.start_ms {
            if (l.rpd > 0 && 1 > l.rpd) || (l.tpd > 0 && tokens > l.tpd) {
                Some(Wait::Never)
            } else {
                None
            }
        } else {
            self.day.wait_for(now_ms, 1, tokens, l.rpd, l.tpd)
        };
        match (m, d) {
            (None, None) => None,
            (Some(w), None) | (None, Some(w)) => Some(w),
            (Some(a), Some(b)) => Some(a.max(b)),
        }
    }

    /// Changes a past charge: `requests` and `tokens` are added (negative to give back) where
    /// the charge was recorded, in each window that still holds it.
    pub fn adjust(&mut self, now_ms: i64, charge: Charge, requests: i64, tokens: i64) {
        self.minute.adjust(now_ms, charge.at_ms, requests, tokens);
        if self.day.start_ms == charge.day_start_ms && now_ms < self.day.end_ms {
            self.day.adjust(requests, tokens);
        }
    }

    /// Requests and tokens used in the current minute and day, as seen at `now_ms`.
    pub fn usage(&self, now_ms: i64) -> (u64, u64, u64, u64) {
        let mut minute = self.minute;
        minute.expire(now_ms);
        let (dr, dt) = if now_ms >= self.day.start_ms && now_ms < self.day.end_ms {
            (self.day.requests, self.day.tokens)
        } else {
            (0, 0)
        };
        (minute.requests(), minute.tokens(), dr, dt)
    }

    /// True when nothing is charged in either window: the slot holds no information.
    pub fn is_idle(&self, now_ms: i64) -> bool {
        let (mr, mt, dr, dt) = self.usage(now_ms);
        mr == 0 && mt == 0 && dr == 0 && dt == 0
    }

    /// After a crash, assumes the worst about the unknown interval `[saved_ms, now_ms]`: the
    /// minute window is full from now on, and the day may have used up to what the per-minute
    /// limits allowed in that time (or all of it when there is no per-minute limit).
    pub fn assume_worst_since(&mut self, saved_ms: i64, now_ms: i64) {
        let l = self.limits;
        let gap = (now_ms - saved_ms).max(0);
        let minutes = (gap / WINDOW_MS + 1) as u64;
        let extra_requests = if l.rpm > 0 {
            l.rpm.saturating_mul(minutes)
        } else {
            l.rpd
        };
        let extra_tokens = if l.tpm > 0 {
            l.tpm.saturating_mul(minutes)
        } else {
            l.tpd
        };
        if self.day.start_ms != 0 && now_ms < self.day.end_ms {
            // Still the saved day: add what the gap may have used, up to the limit.
            let d = &mut self.day;
            d.requests = d.requests.max(d.requests.saturating_add(extra_requests).min(l.rpd));
            d.tokens = d.tokens.max(d.tokens.saturating_add(extra_tokens).min(l.tpd));
        } else {
            // The saved day is over (or none was started): the gap may have used part of the
            // day we are in now, which is not known until the window rolls into it.
            self.day.carry_requests = extra_requests.min(l.rpd);
            self.day.carry_tokens = extra_tokens.min(l.tpd);
            self.day.carry_until_ms = now_ms;
        }
        self.minute.fill_to(now_ms, l.rpm, l.tpm);
    }
}

impl ScopeWindows {
    /// After a failover (failover.rs): the day is at least what the primary recorded at
    /// `recorded_at_ms` plus what the limits allowed from then until `now_ms`, and the minute
    /// window is full from `now_ms` on. Applying it twice changes nothing more.
    pub fn catch_up(
        &mut self,
        recorded: DayWindow,
        recorded_at_ms: i64,
        now_ms: i64,
        bounds: impl Fn(i64) -> (i64, i64),
    ) {
        let mut known = ScopeWindows {
            limits: self.limits,
            generation: self.generation,
            minute: MinuteLog::default(),
            day: recorded,
        };
        known.assume_worst_since(recorded_at_ms, now_ms);
        known.day.roll(now_ms, &bounds);
        self.day.roll(now_ms, &bounds);
        self.day.requests = self.day.requests.max(known.day.requests);
        self.day.tokens = self.day.tokens.max(known.day.tokens);
        self.minute.fill_to(now_ms, self.limits.rpm, self.limits.tpm);
    }
}

impl ScopeWindows {
    /// Tables copied from a cluster that has stopped (pg_upgrade, a restored dump): the day is
    /// at least what it recorded at `recorded_at_ms`, and while a grant it made before it
    /// stopped may still be in a rolling minute (its last record is less than a minute and
    /// `unrecorded_ms`, the time between records, old), the minute window is full.
    pub fn apply_record(
        &mut self,
        recorded: DayWindow,
        recorded_at_ms: i64,
        unrecorded_ms: i64,
        now_ms: i64,
        bounds: impl Fn(i64) -> (i64, i64),
    ) {
        let mut known = recorded;
        known.roll(now_ms, &bounds);
        self.day.roll(now_ms, &bounds);
        self.day.requests = self.day.requests.max(known.requests);
        self.day.tokens = self.day.tokens.max(known.tokens);
        if now_ms - recorded_at_ms < WINDOW_MS + unrecorded_ms.max(0) {
            self.minute.fill_to(now_ms, self.limits.rpm, self.limits.tpm);
        }
    }
}

/// Little-endian encoding of window state for the state file (persist.rs).
pub mod codec {
    use super::*;

    pub fn put_u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn put_i64(out: &mut Vec<u8>, v: i64) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn put_u32(out: &mut Vec<u8>, v: u32) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn put_i32(out: &mut Vec<u8>, v: i32) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    fn take<const N: usize>(input: &mut &[u8]) -> Option<[u8; N]> {
        if input.len() < N {
            return None;
        }
        let (head, rest) = input.split_at(N);
        *input = rest;
        head.try_into().ok()
    }

    pub fn get_u64(input: &mut &[u8]) -> Option<u64> {
        take::<8>(input).map(u64::from_le_bytes)
    }

    pub fn get_i64(input: &mut &[u8]) -> Option<i64> {
        take::<8>(input).map(i64::from_le_bytes)
    }

    pub fn get_u32(input: &mut &[u8]) -> Option<u32> {
        take::<4>(input).map(u32::from_le_bytes)
    }

    pub fn get_i32(input: &mut &[u8]) -> Option<i32> {
        take::<4>(input).map(i32::from_le_bytes)
    }

    impl ScopeWindows {
        pub fn encode(&self, out: &mut Vec<u8>) {
            let l = self.limits;
            for v in [l.rpm, l.rpd, l.tpm, l.tpd, self.generation] {
                put_u64(out, v);
            }
            put_u32(out, u32::from(self.minute.len));
            for i in 0..self.minute.len as usize {
                let e = self.minute.get(i);
                put_i64(out, self.minute.at_ms(i));
                put_u64(out, u64::from(e.requests));
                put_u64(out, e.tokens);
            }
            let d = self.day;
            for v in [d.start_ms, d.end_ms] {
                put_i64(out, v);
            }
            for v in [d.requests, d.tokens, d.carry_requests, d.carry_tokens] {
                put_u64(out, v);
            }
            put_i64(out, d.carry_until_ms);
        }

        pub fn decode(input: &mut &[u8]) -> Option<ScopeWindows> {
            let mut w = ScopeWindows {
                limits: Limits {
                    rpm: get_u64(input)?,
                    rpd: get_u64(input)?,
                    tpm: get_u64(input)?,
                    tpd: get_u64(input)?,
                },
                generation: get_u64(input)?,
                ..Default::default()
            };
            let n = get_u32(input)? as usize;
            if n > LOG_CAPACITY {
                return None;
            }
            for _ in 0..n {
                let (at, requests, tokens) = (get_i64(input)?, get_u64(input)?, get_u64(input)?);
                w.minute.charge(at, requests, tokens);
            }
            w.day = DayWindow {
                start_ms: get_i64(input)?,
                end_ms: get_i64(input)?,
                requests: get_u64(input)?,
                tokens: get_u64(input)?,
                carry_requests: get_u64(input)?,
                carry_tokens: get_u64(input)?,
                carry_until_ms: get_i64(input)?,
            };
            Some(w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_day(now: i64) -> (i64, i64) {
        let day = 86_400_000;
        let start = now.div_euclid(day) * day;
        (start, start + day)
    }

    fn windows(rpm: u64, rpd: u64, tpm: u64, tpd: u64) -> ScopeWindows {
        ScopeWindows {
            limits: Limits { rpm, rpd, tpm, tpd },
            ..Default::default()
        }
    }

    const T0: i64 = 1_900_000_000_000; // a whole day boundary is not needed here

    #[test]
    fn rpm_grants_exactly_the_limit_then_waits_exactly() {
        let mut w = windows(3, 0, 0, 0);
        assert!(w.try_charge(T0, 0, fixed_day).is_ok());
        assert!(w.try_charge(T0 + 10_000, 0, fixed_day).is_ok());
        assert!(w.try_charge(T0 + 20_000, 0, fixed_day).is_ok());
        assert_eq!(w.try_charge(T0 + 30_000, 0, fixed_day), Err(Wait::Ms(30_000)));
        // One millisecond before the first grant leaves the window: still refused.
        assert_eq!(w.try_charge(T0 + 59_999, 0, fixed_day), Err(Wait::Ms(1)));
        assert!(w.try_charge(T0 + 60_000, 0, fixed_day).is_ok());
        assert_eq!(w.try_charge(T0 + 60_001, 0, fixed_day), Err(Wait::Ms(9_999)));
    }

    #[test]
    fn no_double_burst_across_a_minute_boundary() {
        // A fixed-minute counter would allow 2 at 00:59.9 and 2 more at 01:00.0.
        let mut w = windows(2, 0, 0, 0);
        let t = T0 - T0 % 60_000 + 59_900;
        assert!(w.try_charge(t, 0, fixed_day).is_ok());
        assert!(w.try_charge(t, 0, fixed_day).is_ok());
        assert_eq!(w.try_charge(t + 100, 0, fixed_day), Err(Wait::Ms(59_900)));
    }

    #[test]
    fn tokens_per_minute_and_refunds() {
        let mut w = windows(0, 0, 1_000, 0);
        let c = w.try_charge(T0, 800, fixed_day).unwrap();
        assert_eq!(w.try_charge(T0 + 1, 300, fixed_day), Err(Wait::Ms(59_999)));
        // The call used only 100 tokens: 700 come back.
        w.adjust(T0 + 2, c, 0, -700);
        assert!(w.try_charge(T0 + 3, 300, fixed_day).is_ok());
        assert_eq!(w.usage(T0 + 3).1, 400);
        // More than the whole limit never fits.
        assert_eq!(w.try_charge(T0 + 4, 1_001, fixed_day), Err(Wait::Never));
    }

    #[test]
    fn overrun_is_charged_and_blocks_later_requests() {
        let mut w = windows(0, 0, 1_000, 0);
        let c = w.try_charge(T0, 100, fixed_day).unwrap();
        w.adjust(T0 + 5, c, 0, 900); // actual 1000
        assert_eq!(w.try_charge(T0 + 6, 1, fixed_day), Err(Wait::Ms(59_994)));
    }

    #[test]
    fn day_limit_resets_at_day_end() {
        let (start, end) = fixed_day(T0);
        let mut w = windows(0, 2, 0, 0);
        assert!(w.try_charge(start + 5, 0, fixed_day).is_ok());
        assert!(w.try_charge(start + 6, 0, fixed_day).is_ok());
        assert_eq!(w.try_charge(start + 7, 0, fixed_day), Err(Wait::Ms(end - start - 7)));
        assert!(w.try_charge(end, 0, fixed_day).is_ok());
    }

    #[test]
    fn adjust_of_a_previous_day_leaves_today_alone() {
        let (start, end) = fixed_day(T0);
        let mut w = windows(0, 10, 0, 0);
        let c = w.try_charge(end - 1, 5, fixed_day).unwrap();
        w.try_charge(end + 1, 0, fixed_day).unwrap();
        w.adjust(end + 2, c, -1, -5);
        assert_eq!(w.day.requests, 1);
        assert!(start < end);
    }

    #[test]
    fn release_gives_back_the_request() {
        let mut w = windows(1, 1, 0, 0);
        let c = w.try_charge(T0, 0, fixed_day).unwrap();
        assert!(w.try_charge(T0 + 1, 0, fixed_day).is_err());
        w.adjust(T0 + 2, c, -1, 0);
        assert!(w.try_charge(T0 + 3, 0, fixed_day).is_ok());
    }

    #[test]
    fn retry_is_the_later_of_minute_and_day() {
        let (_, end) = fixed_day(T0);
        let mut w = windows(1, 1, 0, 0);
        w.try_charge(end - 30_000, 0, fixed_day).unwrap();
        // minute frees in 59 s, but the day frees only at midnight (29 s) - both must hold:
        // the later one wins.
        assert_eq!(w.try_charge(end - 29_000, 0, fixed_day), Err(Wait::Ms(59_000)));
    }

    #[test]
    fn a_record_copied_from_a_stopped_cluster_keeps_the_day_and_a_recent_minute() {
        let (start, end) = fixed_day(T0);
        let recorded = DayWindow {
            start_ms: start,
            end_ms: end,
            requests: 40,
            tokens: 4_000,
            ..Default::default()
        };
        // Ten minutes of pg_upgrade: today's 40 count, the minute is free.
        let mut w = windows(15, 200, 0, 0);
        w.apply_record(recorded, T0, 10_000, T0 + 600_000, fixed_day);
        assert_eq!(w.usage(T0 + 600_000), (0, 0, 40, 4_000));
        assert!(w.try_charge(T0 + 600_000, 0, fixed_day).is_ok());
        // Twenty seconds after the record: grants of the last minute may still count.
        let mut w = windows(15, 200, 0, 0);
        w.apply_record(recorded, T0, 10_000, T0 + 20_000, fixed_day);
        assert!(w.try_charge(T0 + 20_000, 0, fixed_day).is_err());
        assert_eq!(w.usage(T0 + 20_000).2, 40);
        // A record of an earlier day counts nothing today; a day-only scope keeps its day.
        let mut w = windows(0, 200, 0, 0);
        w.apply_record(recorded, T0, 10_000, end + 1, fixed_day);
        assert_eq!(w.usage(end + 1).2, 0);
        let mut w = windows(0, 200, 0, 0);
        w.apply_record(recorded, T0, 10_000, T0 + 600_000, fixed_day);
        assert_eq!(w.usage(T0 + 600_000).2, 40);
    }

    #[test]
    fn a_log_busy_for_months_keeps_exact_times() {
        // Entries are offsets from a base in 32 bits: a log never empty for longer than 49 days
        // (a busy scope) moves its base on and still reports exact waits.
        let mut w = windows(3, 0, 0, 0);
        let mut t = T0;
        let end = T0 + 60 * 86_400_000;
        while t < end {
            assert!(w.try_charge(t, 0, fixed_day).is_ok());
            t += 30_000;
        }
        assert!(w.try_charge(t, 0, fixed_day).is_ok());
        assert!(w.try_charge(t + 1, 0, fixed_day).is_ok());
        // The charge at t - 30 s is the oldest still counting: it leaves at t + 30 s.
        assert_eq!(w.try_charge(t + 2, 0, fixed_day), Err(Wait::Ms(30_000 - 2)));
        assert_eq!(w.minute.newest_ms(), Some(t + 1));
    }

    #[test]
    fn an_entry_that_saturates_counts_too_much_never_too_little() {
        let mut log = CallerLog::default();
        log.charge(T0, u64::from(u32::MAX), 0);
        log.charge(T0, 10, 0);
        assert_eq!(log.requests(), u64::from(u32::MAX) + 10);
        log.adjust(T0 + 1, T0, -5, 0);
        assert!(log.requests() >= u64::from(u32::MAX));
        log.expire(T0 + WINDOW_MS);
        assert_eq!((log.requests(), log.tokens(), log.len()), (0, 0, 0));
    }

    #[test]
    fn merging_is_conservative_and_bounded() {
        // Many distinct instants: more than the log holds.
        let mut w = windows(10_000, 0, 0, 0);
        for i in 0..1_000 {
            w.try_charge(T0 + i * 50, 0, fixed_day).unwrap();
        }
        assert!(w.minute.len() <= LOG_CAPACITY);
        assert_eq!(w.minute.requests(), 1_000);
        // Everything charged by T0+49_950 is gone 60 s after that, at the latest.
        w.minute.expire(T0 + 49_950 + WINDOW_MS);
        assert_eq!(w.minute.requests(), 0);
    }

    /// A brute-force model: the true grants, with their exact times.
    #[test]
    fn never_overshoots_any_60s_span_under_random_load() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..40 {
            let rpm = 1 + rnd() % 300;
            let tpm = 500 + rnd() % 5_000;
            let mut w = windows(rpm, 0, tpm, 0);
            let mut grants: Vec<(i64, u64)> = Vec::new();
            let mut t = T0;
            let mut refused_while_truly_free = 0;
            for _ in 0..5_000 {
                t += (rnd() % 400) as i64;
                let tok = rnd() % 200;
                match w.try_charge(t, tok, fixed_day) {
                    Ok(_) => grants.push((t, tok)),
                    Err(Wait::Ms(ms)) => {
                        assert!(ms >= 1);
                        // A refusal must be real or a conservative merge artifact: count them.
                        let (r, k) = window_sum(&grants, t);
                        if r < rpm && k + tok <= tpm {
                            refused_while_truly_free += 1;
                        }
                    }
                    Err(Wait::Never) => assert!(tok > tpm),
                }
            }
            // Zero overshoot: every 60 s span ending at a grant holds at most the limits.
            for &(at, _) in &grants {
                let (r, k) = window_sum(&grants, at);
                assert!(r <= rpm, "round {round}: {r} requests > rpm {rpm}");
                assert!(k <= tpm, "round {round}: {k} tokens > tpm {tpm}");
            }
            // Conservative merging must stay rare.
            assert!(
                refused_while_truly_free * 20 <= grants.len().max(20),
                "round {round}: {refused_while_truly_free}"
            );
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut w = windows(100, 1_000, 50_000, 0);
        for i in 0..10 {
            w.try_charge(T0 + i * 1_000, 40 * i as u64, fixed_day).unwrap();
        }
        w.generation = 7;
        let mut bytes = Vec::new();
        w.encode(&mut bytes);
        let mut input = &bytes[..];
        let back = ScopeWindows::decode(&mut input).unwrap();
        assert!(input.is_empty());
        assert_eq!(back.limits, w.limits);
        assert_eq!(back.generation, 7);
        assert_eq!(back.usage(T0 + 9_500), w.usage(T0 + 9_500));
        assert_eq!(back.wait_for(T0 + 9_500, 10_000), w.wait_for(T0 + 9_500, 10_000));
        // Truncated input is rejected, not misread.
        let mut short = &bytes[..bytes.len() - 1];
        assert!(ScopeWindows::decode(&mut short).is_none());
    }

    fn window_sum(grants: &[(i64, u64)], at: i64) -> (u64, u64) {
        grants
            .iter()
            .filter(|(g, _)| *g <= at && *g + WINDOW_MS > at)
            .fold((0, 0), |(r, k), (_, tok)| (r + 1, k + tok))
    }

    #[test]
    fn assume_worst_fills_minute_and_bounds_day() {
        let (start, _) = fixed_day(T0);
        let mut w = windows(10, 1_000, 0, 0);
        w.try_charge(start + 1_000, 0, fixed_day).unwrap();
        w.assume_worst_since(start + 1_000, start + 3_000);
        // The window is full: the known grant (at +1 s) leaves it first, at +61 s.
        assert_eq!(w.try_charge(start + 3_001, 0, fixed_day), Err(Wait::Ms(57_999)));
        assert_eq!(w.minute.requests(), 10);
        assert_eq!(w.day.requests, 11);
        // Without a per-minute limit the rest of the day is assumed used.
        let mut w = windows(0, 50, 0, 0);
        w.try_charge(start + 1_000, 0, fixed_day).unwrap();
        w.assume_worst_since(start + 1_000, start + 2_000);
        assert!(w.try_charge(start + 3_000, 0, fixed_day).is_err());
    }

    #[test]
    fn assume_worst_across_midnight_carries_into_the_new_day() {
        let (_, end) = fixed_day(T0);
        let mut w = windows(5, 100, 0, 0);
        w.try_charge(end - 500, 0, fixed_day).unwrap();
        // Saved just before midnight, restored just after: the new day may already hold up to
        // one minute's worth (5) of grants.
        w.assume_worst_since(end - 400, end + 1_000);
        w.minute = MinuteLog::default();
        w.try_charge(end + 2_000, 0, fixed_day).unwrap();
        assert_eq!(w.day.requests, 6);
        // A later day starts from zero.
        w.try_charge(end + 86_400_000, 0, fixed_day).unwrap();
        assert_eq!(w.day.requests, 1);
    }

    fn day_of(now_ms: i64) -> (i64, i64) {
        let start = now_ms.div_euclid(86_400_000) * 86_400_000;
        (start, start + 86_400_000)
    }

    #[test]
    fn a_full_log_folds_charges_of_the_newest_bucket_into_its_newest_entry() {
        // 64 charges a second apart fill the log; the next ones, in the newest entry's
        // one-second bucket, join that entry (recorded at their own, later time) and leave the
        // older entries alone.
        let mut log = MinuteLog::default();
        let base = T0 - T0 % 1_000;
        for i in 0..LOG_CAPACITY as i64 {
            log.charge(base + i * 1_000, 1, 10);
        }
        let newest = base + (LOG_CAPACITY as i64 - 1) * 1_000;
        log.charge(newest + 300, 2, 20);
        log.charge(newest + 900, 1, 5);
        assert_eq!(log.len(), LOG_CAPACITY);
        assert_eq!(log.newest_ms(), Some(newest + 900));
        assert_eq!((log.requests(), log.tokens()), (LOG_CAPACITY as u64 + 3, 640 + 25));
        // The oldest entry still leaves the window on time; the newest one a minute after the
        // last charge it holds.
        log.expire(base + WINDOW_MS);
        assert_eq!(log.requests(), LOG_CAPACITY as u64 + 2);
        log.expire(newest + 900 + WINDOW_MS - 1);
        assert_eq!((log.requests(), log.tokens()), (4, 35));
        // A charge of a new bucket is an entry of its own.
        log.charge(newest + 1_000, 1, 1);
        assert_eq!(log.newest_ms(), Some(newest + 1_000));
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn a_saturated_key_keeps_getting_its_limit_minute_after_minute() {
        // 600 rpm asked for every 50 ms for ten minutes: every minute after the first grants
        // (nearly) the limit again; merging entries never carries charges ever later.
        let mut w = windows(600, 0, 0, 0);
        let start = T0;
        let mut per_minute = [0u64; 10];
        for i in 0..12_000i64 {
            let now = start + i * 50;
            if w.try_charge(now, 0, fixed_day).is_ok() {
                per_minute[((now - start) / 60_000) as usize] += 1;
            }
        }
        assert_eq!(per_minute[0], 600);
        for (m, n) in per_minute.iter().enumerate().skip(1) {
            assert!(*n >= 590 && *n <= 600, "minute {m}: {n} granted of 600: {per_minute:?}");
        }
    }

    #[test]
    fn catch_up_adds_what_the_limits_allowed_since_the_record() {
        let limits = Limits {
            rpm: 30,
            rpd: 100,
            tpm: 0,
            tpd: 0,
        };
        let noon = 20_000 * 86_400_000 + 43_200_000;
        // The standby's own (older) view: 5 used today.
        let mut w = ScopeWindows {
            limits,
            ..Default::default()
        };
        w.day.roll(noon - 3_600_000, day_of);
        w.day.requests = 5;
        // The primary recorded 40 used, 20 s before the catch-up.
        let mut recorded = DayWindow::default();
        recorded.roll(noon - 20_000, day_of);
        recorded.requests = 40;
        w.catch_up(recorded, noon - 20_000, noon, day_of);
        // 40 recorded, plus at most one minute's 30 since: 70; and the minute is full.
        assert_eq!(w.usage(noon), (30, 0, 70, 0));
        assert!(w.wait_for(noon, 0).is_some());
        // Applying it again changes nothing.
        w.catch_up(recorded, noon - 20_000, noon, day_of);
        assert_eq!(w.usage(noon), (30, 0, 70, 0));
        // A minute later the day allows exactly 30 more.
        let mut granted = 0;
        for i in 0..100 {
            if w.try_charge(noon + 61_000 + i * 1_000, 0, day_of).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 30);
    }

    #[test]
    fn catch_up_keeps_the_larger_of_the_two_days_and_caps_at_the_limit() {
        let limits = Limits {
            rpm: 30,
            rpd: 40,
            tpm: 1_000,
            tpd: 1_500,
        };
        let noon = 20_000 * 86_400_000 + 43_200_000;
        let mut w = ScopeWindows {
            limits,
            ..Default::default()
        };
        w.day.roll(noon, day_of);
        w.day.requests = 39;
        let mut recorded = DayWindow::default();
        recorded.roll(noon - 5_000, day_of);
        recorded.requests = 30;
        recorded.tokens = 900;
        w.catch_up(recorded, noon - 5_000, noon, day_of);
        // 30 + 30 capped at 40; tokens 900 + 1000 capped at 1500.
        assert_eq!(w.usage(noon), (30, 1_000, 40, 1_500));
        let mut late = ScopeWindows {
            limits,
            ..Default::default()
        };
        // Recorded yesterday evening, caught up after midnight: the gap's allowance lands today.
        let mut evening = DayWindow::default();
        evening.roll(noon - 60_000, day_of);
        evening.requests = 12;
        let next_day = noon + 12 * 3_600_000 + 10_000;
        late.catch_up(evening, noon + 12 * 3_600_000 - 20_000, next_day, day_of);
        assert_eq!(late.usage(next_day).2, 30);
    }
}
