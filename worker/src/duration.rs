//! Durations as operators write them: `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.

use std::time::Duration;

pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a duration (examples: 500ms, 30s, 2m, 1h)"))?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1000.0,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit \"{other}\" in \"{text}\" (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || !(0.0..=7.0 * 86400.0).contains(&seconds) {
        return Err(format!("\"{text}\" is out of range (0 to 7 days)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Go-style durations that providers send in headers and bodies: `1s`, `6m0s`, `20ms`, `26s`,
/// `0.5s`, `1h2m3.5s`.
pub fn parse_compound(text: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_durations() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("15"), Ok(Duration::from_secs(15)));
        assert!(parse("ten").is_err());
        assert!(parse("5 weeks").is_err());
        assert!(parse("30d").is_err());
    }

    #[test]
    fn provider_durations() {
        assert_eq!(parse_compound("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_compound("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_compound("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_compound("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_compound("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_compound("soon"), None);
        assert_eq!(parse_compound(""), None);
    }
}
