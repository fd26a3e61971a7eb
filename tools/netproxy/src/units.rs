//! Human-readable durations, sizes and rates for the CLI and control
//! commands.
//!
//! - Durations use `humantime`: `"5ms"`, `"250us"`, `"1s"`, `"0"`.
//! - Sizes are binary, like repblock's config: `"4096"`, `"512B"`, `"4KiB"`,
//!   `"100MiB"`, `"1GiB"`; the short forms `"4K"`, `"1M"`, `"1G"` (and
//!   `"4KB"`, `"1MB"` …) are binary too. Units are case-insensitive; no
//!   spaces, signs or fractions.
//! - Rates are sizes per second, with an optional `"/s"` suffix
//!   (`"100MiB"`, `"100MiB/s"`), or `"off"` / `"none"` / `"0"` for no cap.

use std::time::Duration;

/// Why a duration, size or rate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{0:?} is not a duration (examples: \"5ms\", \"250us\", \"1s\")")]
    NotADuration(String),
    #[error("{0:?} is not a size (examples: \"64KiB\", \"100MiB\")")]
    NotASize(String),
    #[error("{0:?} is too large")]
    Overflow(String),
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

/// Parses a duration (`humantime` syntax).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(|_| UnitError::NotADuration(s.to_string()))
}

/// Parses a size in bytes (binary units).
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
    let n: u64 = num.parse().map_err(|_| UnitError::Overflow(s.to_string()))?;
    n.checked_mul(mult).ok_or_else(|| UnitError::Overflow(s.to_string()))
}

/// Parses a bandwidth cap in bytes per second; `None` means no cap.
pub fn parse_rate(s: &str) -> Result<Option<u64>, UnitError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let size = t.strip_suffix("/s").unwrap_or(t);
    match parse_size(size).map_err(|e| match e {
        UnitError::NotASize(_) => UnitError::NotASize(s.to_string()),
        other => other,
    })? {
        0 => Ok(None),
        n => Ok(Some(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(matches!(parse_duration("5"), Err(UnitError::NotADuration(_))));
        assert!(matches!(parse_duration("fast"), Err(UnitError::NotADuration(_))));
        assert!(matches!(parse_duration(""), Err(UnitError::NotADuration(_))));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2TB"), Ok(2 << 40));
        for bad in ["", "MiB", "1 MiB", "-1", "1.5MiB", "1XiB"] {
            assert_eq!(parse_size(bad), Err(UnitError::NotASize(bad.to_string())), "{bad:?}");
        }
        assert!(matches!(parse_size("99999999999999999999"), Err(UnitError::Overflow(_))));
        assert!(matches!(parse_size("17000000000TiB"), Err(UnitError::Overflow(_))));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100MiB"), Ok(Some(100 << 20)));
        assert_eq!(parse_rate("100MiB/s"), Ok(Some(100 << 20)));
        assert_eq!(parse_rate("off"), Ok(None));
        assert_eq!(parse_rate("OFF"), Ok(None));
        assert_eq!(parse_rate("none"), Ok(None));
        assert_eq!(parse_rate("0"), Ok(None));
        assert_eq!(parse_rate("fast"), Err(UnitError::NotASize("fast".to_string())));
        assert_eq!(parse_rate("1MiB/h"), Err(UnitError::NotASize("1MiB/h".to_string())));
    }
}
