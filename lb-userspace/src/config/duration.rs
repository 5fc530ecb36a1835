//! Durations written as strings with a unit: `"100ms"`, `"3s"`, `"1m30s"`.
//!
//! A tiny parser rather than a dependency: the grammar is a few lines, and
//! owning it lets the error say exactly what was wrong with the value.

use std::{fmt, time::Duration};

use serde::de::{self, Deserializer, Visitor};

/// Units, longest suffix first so `ms` is not read as `m` + `s`.
const UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

const HINT: &str =
    "expected a number and a unit (ns, us, ms, s, m, h, d), e.g. \"100ms\" or \"3s\"";

/// Parses `"100ms"`, `"1.5s"`, `"1m 30s"`: one or more number+unit parts,
/// optionally separated by spaces, summed. The reason on error is complete
/// enough to show as is.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(format!("empty duration: {HINT}"));
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() {
            return Err(format!("invalid duration {s:?}: {HINT}"));
        }
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let Some(&(_, unit_ns)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(if unit.is_empty() {
                format!("invalid duration {s:?}: missing unit; {HINT}")
            } else {
                format!("invalid duration {s:?}: unknown unit {unit:?}; {HINT}")
            });
        };
        let part = scale(num, unit_ns).ok_or_else(|| format!("invalid duration {s:?}: {HINT}"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
        rest = after.trim_start();
    }
    let secs =
        u64::try_from(total / 1_000_000_000).map_err(|_| format!("duration {s:?} is too large"))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// `num` (digits, at most one `.`) times `unit_ns`, in nanoseconds; fractions
/// below a nanosecond are dropped.
fn scale(num: &str, unit_ns: u128) -> Option<u128> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut ns = int.checked_mul(unit_ns)?;
    // 18 fractional digits are far below a nanosecond for every unit.
    let frac = &frac[..frac.len().min(18)];
    if !frac.is_empty() {
        let digits: u128 = frac.parse().ok()?;
        ns = ns.checked_add(digits * unit_ns / 10u128.pow(frac.len() as u32))?;
    }
    Some(ns)
}

/// Formats a duration the way the config writes it, in the largest unit that
/// is exact: `100ms`, `3s`, `2m`, `1500ms`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    for (unit, per) in [
        ("d", 86_400_000_000_000u128),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if ns.is_multiple_of(per) {
            return format!("{}{unit}", ns / per);
        }
    }
    format!("{ns}ns")
}

/// `#[serde(deserialize_with = "...")]` for a `Duration` written as a string.
pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration string with a unit, e.g. \"100ms\" or \"3s\"")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_units_fractions_and_sums() {
        assert_eq!(parse_duration("100ms"), Ok(ms(100)));
        assert_eq!(parse_duration("3s"), Ok(ms(3000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration(" 1m 30s "), Ok(ms(90_000)));
        assert_eq!(parse_duration("3 s"), Ok(ms(3000)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1d"), Ok(ms(86_400_000)));
    }

    #[test]
    fn rejects_with_a_reason() {
        for (s, why) in [
            ("", "empty"),
            ("3", "missing unit"),
            ("3sec", "unknown unit \"sec\""),
            ("ms", "expected a number"),
            ("1..5s", "expected a number"),
            ("-1s", "expected a number"),
            ("1s foo", "expected a number"),
            ("99999999999999999999999h", "too large"),
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        assert_eq!(format_duration(ms(100)), "100ms");
        assert_eq!(format_duration(ms(3000)), "3s");
        assert_eq!(format_duration(ms(1500)), "1500ms");
        assert_eq!(format_duration(ms(120_000)), "2m");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_nanos(7)), "7ns");
        for d in [
            ms(100),
            ms(1500),
            ms(90_000),
            Duration::from_nanos(123_456_789),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
