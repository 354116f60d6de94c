//! Budget sizes given as a number and a units string, as `start_cache(size=4, units="GB")` took
//! them in the original.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_are_the_sorted_table() {
        let mut names: Vec<&str> = UNITS.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        assert_eq!(names, UNIT_NAMES);
    }
}
