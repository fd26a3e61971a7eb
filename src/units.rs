//! Human-readable sizes and durations.
//!
//! Sizes are binary: `"4096"`, `"512B"`, `"4KiB"`, `"1MiB"`, `"1GiB"`,
//! `"1TiB"`. The short forms `"4K"`, `"1M"`, `"1G"`, `"1T"` (and `"4KB"`,
//! `"1GB"` …) are accepted too and are **also binary** (1G = 2^30 bytes), as
//! block-device tools usually mean them. Units are case-insensitive; a space
//! between number and unit is not accepted (`"1 GB"` is an error), nor are
//! fractions, signs or overflow.
//!
//! Durations use `humantime`: `"500ms"`, `"1s"`, `"2m"`, `"1h 30m"`.
//!
//! The `de_*` functions are serde `deserialize_with` helpers for config
//! fields: sizes accept a string or a non-negative integer (bytes).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// Why a size or duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{0:?} is not a size (examples: \"512MiB\", \"1GiB\")")]
    NotASize(String),
    #[error("{0:?} is too large (at most 2^64-1 bytes)")]
    SizeOverflow(String),
    #[error("{0:?} is not a duration (examples: \"500ms\", \"30s\", \"2m\")")]
    NotADuration(String),
}

const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kb", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mb", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gb", 1 << 30),
    ("gib", 1 << 30),
    ("t", 1 << 40),
    ("tb", 1 << 40),
    ("tib", 1 << 40),
];

/// Parses a size in bytes (see the module docs for the accepted forms).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(UnitError::NotASize(s.to_string()));
    }
    let unit = unit.to_ascii_lowercase();
    let Some(&(_, mult)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(UnitError::NotASize(s.to_string()));
    };
    let n: u64 = num.parse().map_err(|_| UnitError::SizeOverflow(s.to_string()))?;
    n.checked_mul(mult).ok_or_else(|| UnitError::SizeOverflow(s.to_string()))
}

/// Formats a size with the largest binary unit that divides it exactly
/// (`4096` → `"4KiB"`, `1536` → `"1536B"`), so that
/// `parse_size(&format_size(n)) == n`.
pub fn format_size(n: u64) -> String {
    const NAMED: &[(&str, u64)] = &[("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for &(name, mult) in NAMED {
        if n != 0 && n.is_multiple_of(mult) {
            return format!("{}{}", n / mult, name);
        }
    }
    format!("{n}B")
}

/// Formats a size for humans, rounded to one decimal (`"1.5GiB"`); not
/// meant to be parsed back.
pub fn format_size_approx(n: u64) -> String {
    const NAMED: &[(&str, u64)] = &[("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for &(name, mult) in NAMED {
        if n >= mult {
            if n.is_multiple_of(mult) {
                return format!("{}{}", n / mult, name);
            }
            return format!("{:.1}{}", n as f64 / mult as f64, name);
        }
    }
    format!("{n}B")
}

/// Parses a duration (`humantime` syntax).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(|_| UnitError::NotADuration(s.to_string()))
}

/// Formats a duration so that [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"512MiB\" or a number of bytes")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{v} is not a size (it is negative)")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_size(v).map_err(E::custom)
    }
}

/// serde helper: a size given as a string (`"1GiB"`) or an integer (bytes).
pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(SizeVisitor)
}

/// serde helper: an optional size.
pub fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"30s\" or \"500ms\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration(v).map_err(E::custom)
    }
}

/// serde helper: a duration given as a string (`"30s"`).
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_str(DurationVisitor)
}

/// serde helper: an optional duration.
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_documented_size_form() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4kib"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("1G"), Ok(1 << 30), "short forms are binary");
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1gb"), Ok(1 << 30));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn rejects_garbage_negatives_and_overflow() {
        for bad in ["", "-1", "-1GiB", "1 GB", "1.5GiB", "GiB", "1PiB", "12x", " 1GiB", "1GiB ", "+4"] {
            assert_eq!(parse_size(bad), Err(UnitError::NotASize(bad.to_string())), "{bad:?}");
        }
        assert_eq!(parse_size("16777216TiB"), Err(UnitError::SizeOverflow("16777216TiB".into())));
        assert_eq!(
            parse_size("99999999999999999999999"),
            Err(UnitError::SizeOverflow("99999999999999999999999".into()))
        );
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn error_message_gives_examples() {
        let e = parse_size("1 GB").unwrap_err().to_string();
        assert_eq!(e, r#""1 GB" is not a size (examples: "512MiB", "1GiB")"#);
    }

    #[test]
    fn formats_with_largest_exact_unit() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(512), "512B");
        assert_eq!(format_size(4096), "4KiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(3 << 30), "3GiB");
        assert_eq!(format_size((1 << 30) + (1 << 20)), "1025MiB");
        assert_eq!(format_size_approx(1536 << 20), "1.5GiB");
        assert_eq!(format_size_approx(1 << 30), "1GiB");
        assert_eq!(format_size_approx(100), "100B");
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("30 s"), Ok(Duration::from_secs(30)));
        assert!(matches!(parse_duration("soon"), Err(UnitError::NotADuration(_))));
        assert!(matches!(parse_duration("-1s"), Err(UnitError::NotADuration(_))));
        assert!(matches!(parse_duration("10"), Err(UnitError::NotADuration(_))));
    }

    #[derive(serde::Deserialize, Debug)]
    struct Sample {
        #[serde(deserialize_with = "de_size")]
        size: u64,
        #[serde(default, deserialize_with = "de_opt_duration")]
        every: Option<Duration>,
    }

    #[test]
    fn serde_helpers_take_strings_and_integers() {
        let s: Sample = toml::from_str("size = \"2MiB\"\nevery = \"250ms\"").unwrap();
        assert_eq!(s.size, 2 << 20);
        assert_eq!(s.every, Some(Duration::from_millis(250)));
        let s: Sample = toml::from_str("size = 8192").unwrap();
        assert_eq!(s.size, 8192);
        assert_eq!(s.every, None);
        let e = toml::from_str::<Sample>("size = -5").unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
        let e = toml::from_str::<Sample>("size = \"lots\"").unwrap_err().to_string();
        assert!(e.contains("\"lots\" is not a size"), "{e}");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
        }

        #[test]
        fn unit_multiples_round_trip(n in 0u64..(1 << 20), shift in prop::sample::select(vec![0u32, 10, 20, 30, 40])) {
            let v = n << shift;
            prop_assert_eq!(parse_size(&format_size(v)), Ok(v));
        }

        #[test]
        fn durations_round_trip(ms in 0u64..(1 << 40)) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
