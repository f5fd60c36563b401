//! Money: prices, budgets and their periods, in integer millionths of the currency of
//! `keypool_prices`, never floating point. A model's price is loaded rounded up to the
//! millionth, a call's cost is rounded up to the millionth, so a cost is never undercounted and
//! 100 × 0.01 is exactly 1.00. Pure: no PostgreSQL in here.

use chrono_tz::Tz;

use crate::policy::calendar;

/// A pool's spend budget, in millionths of the currency of `keypool_prices`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// For the whole pool per period.
    pub limit: Option<u64>,
    /// For each user per period.
    pub per_user: Option<u64>,
    pub period: Period,
    /// What a reservation without a token estimate holds.
    pub default_cost: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

/// A model's price in millionths of the currency: per million input and output tokens (so,
/// per token, in millionths of a millionth), and per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    pub input_per_million: u64,
    pub output_per_million: u64,
    pub per_request: u64,
}

/// Millionths per unit of currency.
pub const MICROS: u64 = 1_000_000;

/// Largest amount a budget may have, in units of currency (so that every sum fits in 63 bits).
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;

/// The period containing `now_ms`: the day number it began on, and when it ends.
pub fn period(budget: &Budget, tz: Tz, now_ms: i64) -> (i32, i64) {
    match budget.period {
        Period::Day => {
            let (day, _, end) = calendar::day_of(tz, now_ms);
            (day, end)
        }
        Period::Month => calendar::month_of(tz, now_ms),
    }
}

/// `a × b / MICROS`, rounded up, without overflow.
fn scaled_up(a: u64, b: u64) -> u64 {
    let p = a as u128 * b as u128;
    (p.div_ceil(MICROS as u128)).min(u64::MAX as u128 / 4) as u64
}

/// What a reservation of `est_tokens` tokens holds on a key of this price.
pub fn estimate(price: &Price, est_tokens: u64, default_cost: u64) -> u64 {
    if est_tokens == 0 {
        return price.per_request.saturating_add(default_cost);
    }
    let dearer = price.input_per_million.max(price.output_per_million);
    price.per_request.saturating_add(scaled_up(est_tokens, dearer))
}

/// What a call that used these tokens cost.
pub fn cost(price: &Price, prompt_tokens: u64, completion_tokens: u64) -> u64 {
    let tokens = prompt_tokens as u128 * price.input_per_million as u128
        + completion_tokens as u128 * price.output_per_million as u128;
    let micros = tokens.div_ceil(MICROS as u128).min(u64::MAX as u128 / 4) as u64;
    price.per_request.saturating_add(micros)
}

/// Parses a decimal amount of currency (as PostgreSQL prints a numeric) into millionths:
/// non-negative, at most six decimal places, at most `MAX_AMOUNT`.
pub fn parse_amount(full: &str) -> Result<u64, String> {
    // What the caller sent is quoted in errors, but never more than 40 characters of it.
    let text = full;
    let shown: String = if full.chars().count() > 40 {
        full.chars().take(40).chain("…".chars()).collect()
    } else {
        full.to_string()
    };
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if text.starts_with('-') {
        return Err(format!("must not be negative, not {shown}"));
    }
    if !digits(whole) || !(frac.is_empty() || digits(frac)) {
        return Err(format!("must be a number, not {shown}"));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 6 {
        return Err(format!("has more than six decimal places: {shown}"));
    }
    let whole = whole.trim_start_matches('0');
    if whole.len() > 13 {
        return Err(format!("must be at most {MAX_AMOUNT}, not {shown}"));
    }
    let units: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| format!("must be a number, not {shown}"))?
    };
    if units > MAX_AMOUNT {
        return Err(format!("must be at most {MAX_AMOUNT}, not {shown}"));
    }
    let micros: u64 = format!("{frac:0<6}").parse().unwrap_or(0);
    Ok(units * MICROS + micros)
}

/// Millionths as a decimal string with six places (for numeric results).
pub fn to_decimal(micros: u64) -> String {
    format!("{}.{:06}", micros / MICROS, micros % MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: u64, output: u64, per_request: u64) -> Price {
        Price {
            input_per_million: input,
            output_per_million: output,
            per_request,
        }
    }

    #[test]
    fn a_hundred_cents_make_exactly_one_unit() {
        let cent = price(0, 0, 10_000);
        let total: u64 = (0..100).map(|_| estimate(&cent, 0, 0)).sum();
        assert_eq!(total, MICROS);
        assert_eq!(to_decimal(total), "1.000000");
    }

    #[test]
    fn estimates_take_the_dearer_price_and_round_up() {
        // $0.15 in, $0.60 out per million tokens (gpt-4o-mini): 1,000 tokens hold 600 millionths.
        let mini = price(150_000, 600_000, 0);
        assert_eq!(estimate(&mini, 1_000, 0), 600);
        // One token at $0.15 per million is 0.15 millionths: rounded up to 1.
        assert_eq!(cost(&mini, 1, 0), 1);
        assert_eq!(cost(&mini, 1_000, 500), 150 + 300);
        // No estimate: the pool's default cost.
        assert_eq!(estimate(&mini, 0, 10_000), 10_000);
        assert_eq!(estimate(&price(0, 0, 5), 0, 10_000), 10_005);
    }

    #[test]
    fn amounts_are_exact_millionths() {
        assert_eq!(parse_amount("1.00"), Ok(MICROS));
        assert_eq!(parse_amount("0.01"), Ok(10_000));
        assert_eq!(parse_amount("0.000001"), Ok(1));
        assert_eq!(parse_amount("25"), Ok(25 * MICROS));
        assert_eq!(parse_amount("0.1230000"), Ok(123_000));
        assert_eq!(parse_amount("1000000000000"), Ok(MAX_AMOUNT * MICROS));
        assert!(parse_amount("0.0000001").is_err());
        assert!(parse_amount("-1").is_err());
        assert!(parse_amount("NaN").is_err());
        assert!(parse_amount("Infinity").is_err());
        assert!(parse_amount("1000000000001").is_err());
        assert!(parse_amount("").is_err());
        assert!(parse_amount(".5").is_err());
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let dear = price(u64::MAX / 2, u64::MAX / 2, u64::MAX / 2);
        assert!(estimate(&dear, u64::MAX, 0) >= u64::MAX / 4);
        assert!(cost(&dear, u64::MAX, u64::MAX) >= u64::MAX / 4);
    }
}
