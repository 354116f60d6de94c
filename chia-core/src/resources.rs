//! Resource amounts and resource sets.
//!
//! Amounts are fixed point with four decimals (as in Ray and HyperQueue), so `0.25` of a
//! resource is exact and sums never drift. `CPU` is built in; every other name is the
//! user's (`adder`, `fpga`, ...). Names are case-sensitive, except that `cpu` means `CPU`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The built-in CPU resource.
pub const CPU: &str = "CPU";

/// The prefix of the per-node affinity resource: each node advertises `node:<name>` = 1,
/// so a task or service can be pinned to one node (`node:head` is the head).
pub const NODE_PREFIX: &str = "node:";

/// A non-negative amount of a resource, in units of 1/10,000.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ResourceAmount(u64);

impl ResourceAmount {
    /// How many fixed-point units make one whole resource.
    pub const SCALE: u64 = 10_000;
    pub const ZERO: ResourceAmount = ResourceAmount(0);

    /// `n` whole units.
    pub const fn whole(n: u64) -> ResourceAmount {
        ResourceAmount(n * Self::SCALE)
    }

    /// The raw fixed-point value (1.0 = 10,000).
    pub const fn from_fixed(units: u64) -> ResourceAmount {
        ResourceAmount(units)
    }

    pub const fn as_fixed(self) -> u64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn saturating_sub(self, other: ResourceAmount) -> ResourceAmount {
        ResourceAmount(self.0.saturating_sub(other.0))
    }

    pub fn checked_add(self, other: ResourceAmount) -> Option<ResourceAmount> {
        self.0.checked_add(other.0).map(ResourceAmount)
    }

    /// Converts a float amount (as written in a macro attribute) with at most four decimals.
    pub fn from_f64(value: f64) -> Result<ResourceAmount, ResourceError> {
        value.to_string().parse()
    }
}

impl fmt::Display for ResourceAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / Self::SCALE;
        let frac = self.0 % Self::SCALE;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:04}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

impl FromStr for ResourceAmount {
    type Err = ResourceError;

    /// Parses `4`, `0.5` or `2.2500`; more than four decimals, a sign or an exponent is an error.
    fn from_str(text: &str) -> Result<ResourceAmount, ResourceError> {
        let bad = || ResourceError::BadAmount(text.to_string());
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && frac.is_empty() || !all_digits(whole) || !all_digits(frac) {
            return Err(bad());
        }
        if frac.len() > 4 {
            return Err(ResourceError::TooPrecise(text.to_string()));
        }
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
        let mut frac_units: u64 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| bad())? };
        for _ in frac.len()..4 {
            frac_units *= 10;
        }
        whole
            .checked_mul(Self::SCALE)
            .and_then(|w| w.checked_add(frac_units))
            .map(ResourceAmount)
            .ok_or_else(bad)
    }
}

/// What can be wrong with a resource list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("resource amount {0:?} is not a non-negative number")]
    BadAmount(String),
    #[error("resource amount {0:?} has more than 4 decimals")]
    TooPrecise(String),
    #[error("resource entry {0:?} is not NAME=AMOUNT")]
    BadEntry(String),
    #[error("resource name {0:?} is empty or contains ',', '=' or whitespace")]
    BadName(String),
    #[error("resource {0:?} is given twice")]
    Duplicate(String),
}

/// A set of named amounts: what a node advertises, or what a task requests.
/// Zero amounts are not stored, so two equal sets compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Resources(BTreeMap<String, ResourceAmount>);

impl Resources {
    pub fn new() -> Resources {
        Resources::default()
    }

    /// Normalises a user-written resource name: `cpu` in any case is the built-in `CPU`.
    pub fn canonical_name(name: &str) -> Result<String, ResourceError> {
        let bad = name.is_empty() || name.contains([',', '=']) || name.chars().any(char::is_whitespace);
        if bad {
            return Err(ResourceError::BadName(name.to_string()));
        }
        Ok(if name.eq_ignore_ascii_case(CPU) { CPU.to_string() } else { name.to_string() })
    }

    /// Sets `name` to `amount` (a zero amount removes it).
    pub fn set(&mut self, name: &str, amount: ResourceAmount) -> Result<(), ResourceError> {
        let name = Self::canonical_name(name)?;
        if amount.is_zero() {
            self.0.remove(&name);
        } else {
            self.0.insert(name, amount);
        }
        Ok(())
    }

    /// Builder form of [`Resources::set`].
    pub fn with(mut self, name: &str, amount: ResourceAmount) -> Result<Resources, ResourceError> {
        self.set(name, amount)?;
        Ok(self)
    }

    pub fn get(&self, name: &str) -> ResourceAmount {
        self.0.get(name).copied().unwrap_or_default()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, ResourceAmount)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Parses `adder=4,CPU=2,fpga=0.5` (an empty string is the empty set).
    ///
    /// ```
    /// use chia_core::{ResourceAmount, Resources};
    /// let r = Resources::parse("adder=4, cpu=0.5").unwrap();
    /// assert_eq!(r.get("adder"), ResourceAmount::whole(4));
    /// assert_eq!(r.get("CPU").to_string(), "0.5");
    /// assert!(Resources::parse("adder").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Resources, ResourceError> {
        let mut out = Resources::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, amount) =
                entry.split_once('=').ok_or_else(|| ResourceError::BadEntry(entry.to_string()))?;
            let name = Self::canonical_name(name.trim())?;
            if out.0.contains_key(&name) {
                return Err(ResourceError::Duplicate(name));
            }
            out.set(&name, amount.trim().parse()?)?;
        }
        Ok(out)
    }

    /// True when every amount in `request` is available here.
    pub fn covers(&self, request: &Resources) -> bool {
        request.iter().all(|(name, amount)| self.get(name) >= amount)
    }

    /// Removes `request` from these amounts; the caller has checked [`Resources::covers`].
    pub fn take(&mut self, request: &Resources) {
        for (name, amount) in request.iter() {
            if let Some(have) = self.0.get_mut(name) {
                *have = have.saturating_sub(amount);
            }
        }
    }

    /// Adds `request` back, never above `capacity`.
    pub fn give_back(&mut self, request: &Resources, capacity: &Resources) {
        for (name, amount) in request.iter() {
            let limit = capacity.get(name);
            let entry = self.0.entry(name.to_string()).or_default();
            *entry = entry.checked_add(amount).unwrap_or(limit).min(limit);
        }
    }

    /// The names in `request` that these amounts cannot cover even when nothing is in use.
    pub fn shortfall(&self, request: &Resources) -> Vec<String> {
        request
            .iter()
            .filter(|(name, amount)| self.get(name) < *amount)
            .map(|(name, amount)| format!("{name}={amount} (has {})", self.get(name)))
            .collect()
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, amount) in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{name}={amount}")?;
        }
        if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_to_four_decimals() {
        assert_eq!("1".parse::<ResourceAmount>().unwrap(), ResourceAmount::whole(1));
        assert_eq!("0.25".parse::<ResourceAmount>().unwrap().as_fixed(), 2_500);
        assert_eq!(".5".parse::<ResourceAmount>().unwrap().as_fixed(), 5_000);
        assert_eq!("1.0001".parse::<ResourceAmount>().unwrap().as_fixed(), 10_001);
        assert!(matches!("0.00001".parse::<ResourceAmount>(), Err(ResourceError::TooPrecise(_))));
        for bad in ["", ".", "-1", "1e3", "abc", "1.2.3"] {
            assert!(bad.parse::<ResourceAmount>().is_err(), "{bad:?} should not parse");
        }
        assert_eq!(ResourceAmount::from_fixed(12_500).to_string(), "1.25");
        assert_eq!(ResourceAmount::from_f64(0.1).unwrap().as_fixed(), 1_000);
    }

    #[test]
    fn sets_parse_cover_take_and_give_back() {
        let capacity = Resources::parse("adder=8,cpu=2").unwrap();
        assert_eq!(capacity.get(CPU), ResourceAmount::whole(2));
        let request = Resources::parse("adder=2").unwrap();
        let mut free = capacity.clone();
        let mut running = 0;
        while free.covers(&request) {
            free.take(&request);
            running += 1;
        }
        assert_eq!(running, 4);
        free.give_back(&request, &capacity);
        assert!(free.covers(&request));
        assert_eq!(Resources::parse("adder=1,adder=2"), Err(ResourceError::Duplicate("adder".into())));
        assert_eq!(Resources::parse("a b=1"), Err(ResourceError::BadName("a b".into())));
        assert_eq!(Resources::parse("x=0").unwrap(), Resources::new());
        assert_eq!(capacity.to_string(), "CPU=2,adder=8");
    }
}
