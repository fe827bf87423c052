//! Durations and sizes as people write them, and back.
//!
//! Durations use humantime's syntax (`10s`, `1m 30s`, `500ms`, `365d`). Sizes are a whole number
//! with an optional unit: `B`, the binary `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024) or the decimal
//! `KB`, `MB`, `GB`, `TB` (powers of 1000); units are case-insensitive and may follow a space.

use std::time::Duration;

/// Parses a humantime duration; the error is humantime's explanation.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| e.to_string())
}

const SIZE_UNITS: [(&str, u64); 9] = [
    ("b", 1),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
];

/// Parses a size in bytes: `1048576`, `512KiB`, `8 MiB`, `1GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(
            "expected a whole number with an optional unit (KiB, MiB, GiB, KB, MB, GB)".into(),
        );
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let multiplier = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|&(_, bytes)| bytes)
            .ok_or_else(|| {
                format!("unknown unit {unit:?}, expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")
            })?
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| "too large".to_string())
}

/// Formats a duration compactly in units humantime reads back: `1m 30s`, `365d`, `250ms`.
///
/// Not `humantime::format_duration`: it counts in months and years of 30.44 and 365.25 days, so the
/// default `max_ttl` of 365d would print as "11months 30days 3h 50m 24s".
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(&str, u128); 7] = [
        ("d", 86_400_000_000_000),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let mut rest = d.as_nanos();
    if rest == 0 {
        return "0s".into();
    }
    let mut parts = Vec::new();
    for (name, nanos) in UNITS {
        if rest >= nanos {
            parts.push(format!("{}{name}", rest / nanos));
            rest %= nanos;
        }
    }
    parts.join(" ")
}

/// Formats a size in the largest unit that divides it exactly: `256MiB`, `1MB`, `1500B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 8] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("TB", 1_000_000_000_000),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
    ];
    if bytes == 0 {
        return "0B".into();
    }
    UNITS
        .iter()
        .find(|&&(_, unit)| bytes.is_multiple_of(unit))
        .map(|&(name, unit)| format!("{}{name}", bytes / unit))
        .unwrap_or_else(|| format!("{bytes}B"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_binary_and_decimal_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("8 mib"), Ok(8 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("12B"), Ok(12));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5GiB").is_err());
        assert!(
            parse_size("3 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert_eq!(parse_size("99999999999TiB"), Err("too large".into()));
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit() {
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(1_000_000), "1MB");
        assert_eq!(format_size(1500), "1500B");
        assert_eq!(format_size(0), "0B");
        for n in [0, 1500, 1 << 20, 3 << 30, 5_000] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }

    #[test]
    fn durations_print_in_units_humantime_reads_back() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(90), "1m 30s"),
            (Duration::from_secs(365 * 86_400), "365d"),
            (Duration::from_millis(1_250), "1s 250ms"),
        ];
        for (d, text) in cases {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
    }
}
