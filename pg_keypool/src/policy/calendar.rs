//! Calendar days in a scope's time zone: when its daily window starts and ends.
//! Gemini's daily quotas reset at midnight America/Los_Angeles (DST-aware); others at UTC.

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, TimeZone};
use chrono_tz::Tz;

/// Parses an IANA time zone name such as `America/Los_Angeles` or `UTC`.
pub fn parse_zone(name: &str) -> Option<Tz> {
    name.parse::<Tz>().ok()
}

/// The (start, end) of the local calendar day that contains `now_ms`, as UTC milliseconds.
pub fn day_bounds(tz: Tz, now_ms: i64) -> (i64, i64) {
    let Some(utc) = DateTime::from_timestamp_millis(now_ms) else {
        return (now_ms, now_ms + 86_400_000);
    };
    let date = utc.with_timezone(&tz).date_naive();
    let start = first_instant(tz, date);
    let end = date
        .succ_opt()
        .map(|d| first_instant(tz, d))
        .unwrap_or(start + 86_400_000);
    (start, end)
}

/// The local calendar day containing `now_ms`: its number (days since 1970-01-01 in that zone)
/// and its (start, end) in UTC milliseconds.
pub fn day_of(tz: Tz, now_ms: i64) -> (i32, i64, i64) {
    let (start, end) = day_bounds(tz, now_ms);
    let date = DateTime::from_timestamp_millis(now_ms)
        .map(|utc| utc.with_timezone(&tz).date_naive())
        .unwrap_or_default();
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date");
    ((date - epoch).num_days() as i32, start, end)
}

/// The date of a day number.
pub fn date_of(day: i32) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date") + chrono::Duration::days(day as i64)
}

/// The day number of a date.
pub fn day_number(date: NaiveDate) -> i32 {
    (date - NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date")).num_days() as i32
}

/// The local calendar month containing `now_ms`: the day number of its first day and its end
/// (the first instant of the next month) in UTC milliseconds.
pub fn month_of(tz: Tz, now_ms: i64) -> (i32, i64) {
    let date = DateTime::from_timestamp_millis(now_ms)
        .map(|utc| utc.with_timezone(&tz).date_naive())
        .unwrap_or_default();
    let first = date.with_day(1).unwrap_or(date);
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
    }
    .unwrap_or(first);
    (day_number(first), first_instant(tz, next))
}

/// The first instant of a local date. Where midnight does not exist (a DST jump at 00:00),
/// the day begins at the first local time that does.
fn first_instant(tz: Tz, date: NaiveDate) -> i64 {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight is a valid time");
    for _ in 0..48 {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(dt) => return dt.timestamp_millis(),
            LocalResult::Ambiguous(earliest, _) => return earliest.timestamp_millis(),
            LocalResult::None => t += chrono::Duration::minutes(30),
        }
    }
    t.and_utc().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
    }

    #[test]
    fn utc_day() {
        let tz = parse_zone("UTC").unwrap();
        assert_eq!(
            day_bounds(tz, ms("2026-03-08T12:00:00Z")),
            (ms("2026-03-08T00:00:00Z"), ms("2026-03-09T00:00:00Z"))
        );
    }

    #[test]
    fn pacific_day_follows_dst() {
        let tz = parse_zone("America/Los_Angeles").unwrap();
        // 2026-03-08 is the spring-forward day in the US: 23 hours long.
        let (s, e) = day_bounds(tz, ms("2026-03-08T12:00:00Z"));
        assert_eq!(s, ms("2026-03-08T00:00:00-08:00"));
        assert_eq!(e, ms("2026-03-09T00:00:00-07:00"));
        assert_eq!(e - s, 23 * 3_600_000);
        // 07:59 UTC is still the previous Pacific day.
        let (s2, _) = day_bounds(tz, ms("2026-03-08T07:59:00Z"));
        assert_eq!(s2, ms("2026-03-07T00:00:00-08:00"));
    }

    #[test]
    fn day_numbers_follow_the_zone() {
        let la = parse_zone("America/Los_Angeles").unwrap();
        let utc = parse_zone("UTC").unwrap();
        let t = ms("2026-03-08T07:59:00Z");
        let (d_la, _, end) = day_of(la, t);
        let (d_utc, _, _) = day_of(utc, t);
        assert_eq!(d_utc - d_la, 1);
        assert_eq!(end, ms("2026-03-08T08:00:00Z"));
        assert_eq!(date_of(d_utc).to_string(), "2026-03-08");
        assert_eq!(day_number(date_of(d_la)), d_la);
    }

    #[test]
    fn months_follow_the_zone_and_the_year() {
        let la = parse_zone("America/Los_Angeles").unwrap();
        let utc = parse_zone("UTC").unwrap();
        // 2026-12-01 05:00 UTC is still November in Los Angeles.
        let t = ms("2026-12-01T05:00:00Z");
        let (first, end) = month_of(la, t);
        assert_eq!(date_of(first).to_string(), "2026-11-01");
        assert_eq!(end, ms("2026-12-01T00:00:00-08:00"));
        let (first, end) = month_of(utc, ms("2026-12-31T23:59:59Z"));
        assert_eq!(date_of(first).to_string(), "2026-12-01");
        assert_eq!(end, ms("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn unknown_zone_is_rejected() {
        assert!(parse_zone("Mars/Olympus").is_none());
        assert!(parse_zone("").is_none());
    }

    #[test]
    fn midnight_gap_starts_at_first_valid_time() {
        // America/Santiago skipped 2022-09-11 00:00 -> 01:00.
        let tz = parse_zone("America/Santiago").unwrap();
        let (s, _) = day_bounds(tz, ms("2022-09-11T12:00:00Z"));
        assert_eq!(s, ms("2022-09-11T01:00:00-03:00"));
    }
}
