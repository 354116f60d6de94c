//! How often something may run again: [`Retries`], instead of an integer where `-1` meant
//! "forever".

use serde::{Deserialize, Serialize};
use std::fmt;

/// How many times a task may run again after a failed run (`max_retries`), or a service be
/// re-created after its node is lost (`max_restarts`).
///
/// On the wire and in the head's journal it is the original's integer (`-1` for
/// [`Retries::Forever`]), so records written before this type existed read back the same.
///
/// ```
/// use chia_core::Retries;
/// assert!(Retries::UpTo(2).allows_another(2));
/// assert!(!Retries::UpTo(2).allows_another(3));
/// assert!(Retries::Forever.allows_another(1_000_000));
/// assert!(!Retries::Never.allows_another(1));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "i64", into = "i64")]
pub enum Retries {
    /// Never again: one run only.
    #[default]
    Never,
    /// At most this many more runs.
    UpTo(u32),
    /// Without limit.
    Forever,
}

impl Retries {
    /// Whether run number `again` after the first (1 for the first retry) is allowed.
    pub fn allows_another(self, again: u32) -> bool {
        match self {
            Retries::Never => false,
            Retries::UpTo(limit) => again <= limit,
            Retries::Forever => true,
        }
    }

    /// One retry fewer (after one was used); `Forever` stays `Forever`.
    pub fn one_used(self) -> Retries {
        match self {
            // `UpTo(0)` would mean the same as `Never` and read back as it (the wire form is
            // 0 for both): one spelling, so a head restored from a snapshot agrees.
            Retries::UpTo(0 | 1) | Retries::Never => Retries::Never,
            Retries::UpTo(limit) => Retries::UpTo(limit - 1),
            Retries::Forever => Retries::Forever,
        }
    }

    /// Runs allowed in all, the first included; `None`: without limit.
    pub fn total_runs(self) -> Option<u32> {
        match self {
            Retries::Never => Some(1),
            Retries::UpTo(limit) => Some(limit.saturating_add(1)),
            Retries::Forever => None,
        }
    }
}

/// The wire form: any negative number is `Forever` (a peer cannot make it mean anything
/// else), a number past `u32::MAX` is as good as forever and is kept as the largest limit.
impl From<i64> for Retries {
    fn from(count: i64) -> Retries {
        match count {
            ..0 => Retries::Forever,
            0 => Retries::Never,
            n => Retries::UpTo(u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }
}

impl From<Retries> for i64 {
    fn from(retries: Retries) -> i64 {
        match retries {
            Retries::Never => 0,
            Retries::UpTo(limit) => i64::from(limit),
            Retries::Forever => -1,
        }
    }
}

impl fmt::Display for Retries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retries::Never => f.write_str("no retries"),
            Retries::UpTo(limit) => write!(f, "up to {limit} retries"),
            Retries::Forever => f.write_str("retries without limit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Retries;

    #[test]
    fn the_wire_form_is_the_original_integer() {
        for (retries, count) in [(Retries::Never, 0), (Retries::UpTo(3), 3), (Retries::Forever, -1)] {
            let bytes = rmp_serde::to_vec_named(&retries).unwrap();
            assert_eq!(bytes, rmp_serde::to_vec_named(&count).unwrap());
            assert_eq!(rmp_serde::from_slice::<Retries>(&bytes).unwrap(), retries);
        }
        assert_eq!(Retries::from(-7), Retries::Forever);
        assert_eq!(Retries::from(i64::MAX), Retries::UpTo(u32::MAX));
        assert_eq!(Retries::UpTo(1).one_used().one_used(), Retries::Never);
        assert_eq!(Retries::UpTo(u32::MAX).total_runs(), Some(u32::MAX));
    }
}
