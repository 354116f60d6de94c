//! Budget sizes given as a number and a units string, as `start_cache(size=4, units="GB")` took
//! them in the original, and durations such as `7d` (a `ttl:`).

use std::time::Duration;

use crate::CacheError;

/// Multipliers from a units name to bytes. Everything is a power of 1024: `KB` and `KiB` are
/// the same unit (the original used binary units under decimal names, and configurations rely
/// on it).
const UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KB", 1 << 10),
    ("MB", 1 << 20),
    ("GB", 1 << 30),
    ("TB", 1 << 40),
    ("KIB", 1 << 10),
    ("MIB", 1 << 20),
    ("GIB", 1 << 30),
    ("TIB", 1 << 40),
];

/// The accepted units names, sorted (as the original listed them in its error), matched
/// case-insensitively.
pub const UNIT_NAMES: [&str; 9] = ["B", "GB", "GIB", "KB", "KIB", "MB", "MIB", "TB", "TIB"];

/// Bytes in one `units` (case-insensitive), or `None` for an unknown name.
pub fn unit_multiplier(units: &str) -> Option<u64> {
    let wanted = units.to_ascii_uppercase();
    UNITS.iter().find(|(name, _)| *name == wanted).map(|&(_, multiplier)| multiplier)
}

/// `size × units` in bytes, truncated toward zero like the original's `int(size * UNITS[units])`.
///
/// ```
/// assert_eq!(chia_cache::parse_budget(4.0, "GB").unwrap(), 4 << 30);
/// assert_eq!(chia_cache::parse_budget(1.5, "kib").unwrap(), 1536);
/// assert!(chia_cache::parse_budget(1.0, "parsecs").is_err());
/// ```
pub fn parse_budget(size: f64, units: &str) -> Result<u64, CacheError> {
    let multiplier = unit_multiplier(units)
        .ok_or_else(|| CacheError::UnknownUnits { units: units.to_owned(), choices: UNIT_NAMES.to_vec() })?;
    // `is_finite` is false for NaN too.
    if !size.is_finite() || size < 0.0 {
        return Err(CacheError::InvalidSize { size });
    }
    let bytes = size * multiplier as f64;
    // 2^64 is exactly representable; anything at or above it would saturate silently in `as`.
    if bytes >= 18_446_744_073_709_551_616.0 {
        return Err(CacheError::SizeOverflow { size, units: units.to_owned() });
    }
    Ok(bytes as u64)
}

/// Seconds in each duration unit, by its letter.
const DURATION_UNITS: [(char, f64); 4] = [('s', 1.0), ('m', 60.0), ('h', 3600.0), ('d', 86_400.0)];

/// A duration written as a number of seconds, or a number and one of `s`, `m`, `h`, `d`
/// (case-insensitive, spaces allowed between): `90`, `30s`, `15m`, `1.5h`, `7d`. The number
/// must be finite and not negative.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(chia_cache::units::parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
/// assert_eq!(chia_cache::units::parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
/// assert_eq!(chia_cache::units::parse_duration("90").unwrap(), Duration::from_secs(90));
/// assert!(chia_cache::units::parse_duration("7 weeks").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, CacheError> {
    let invalid = || CacheError::InvalidDuration { text: text.to_owned() };
    let trimmed = text.trim();
    let (number, multiplier) = match trimmed.chars().last() {
        Some(last) if last.is_ascii_alphabetic() => {
            let unit = last.to_ascii_lowercase();
            let &(_, multiplier) =
                DURATION_UNITS.iter().find(|(letter, _)| *letter == unit).ok_or_else(invalid)?;
            (trimmed[..trimmed.len() - 1].trim_end(), multiplier)
        }
        _ => (trimmed, 1.0),
    };
    let value: f64 = number.parse().map_err(|_| invalid())?;
    if !value.is_finite() || value < 0.0 || number.starts_with(['+', '-']) {
        return Err(invalid());
    }
    Duration::try_from_secs_f64(value * multiplier).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_are_the_sorted_table() {
        let mut names: Vec<&str> = UNITS.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        assert_eq!(names, UNIT_NAMES);
    }

    #[test]
    fn durations_take_a_number_and_one_unit() {
        let seconds = |text: &str| parse_duration(text).map(|duration| duration.as_secs_f64()).ok();
        assert_eq!(seconds("30s"), Some(30.0));
        assert_eq!(seconds("15m"), Some(900.0));
        assert_eq!(seconds("12h"), Some(43_200.0));
        assert_eq!(seconds("7d"), Some(604_800.0));
        assert_eq!(seconds("7D"), Some(604_800.0));
        assert_eq!(seconds(" 2 h "), Some(7200.0));
        assert_eq!(seconds("0.5s"), Some(0.5));
        assert_eq!(seconds("3600"), Some(3600.0));
        for bad in ["", "d", "7w", "7dd", "1h30m", "-5s", "+5s", "nan", "inf", "1e400s", "seven days"] {
            assert_eq!(seconds(bad), None, "{bad:?}");
        }
    }
}
