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

/// A non-negative amount of a resource, in units of 1/10,000. On the wire (a binary format)
/// it is the fixed-point integer; in a human-readable format (JSON, YAML) it is the amount
/// itself (`2.5`), so `chia status --json` reads as the user wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceAmount(u64);

impl Serialize for ResourceAmount {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_f64(self.as_f64())
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ResourceAmount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let amount = f64::deserialize(deserializer)?;
            ResourceAmount::from_f64(amount).map_err(serde::de::Error::custom)
        } else {
            u64::deserialize(deserializer).map(ResourceAmount)
        }
    }
}

impl ResourceAmount {
    /// How many fixed-point units make one whole resource.
    pub const SCALE: u64 = 10_000;
    /// Nothing of a resource (a set does not store it).
    pub const ZERO: ResourceAmount = ResourceAmount(0);
    /// The largest amount (about 1.8e15 whole units): what 64 bits of fixed point can hold.
    pub const MAX: ResourceAmount = ResourceAmount(u64::MAX);

    /// `n` whole units.
    pub const fn whole(n: u64) -> ResourceAmount {
        ResourceAmount(n * Self::SCALE)
    }

    /// The raw fixed-point value (1.0 = 10,000).
    pub const fn from_fixed(units: u64) -> ResourceAmount {
        ResourceAmount(units)
    }

    /// The raw fixed-point value, as sent on the wire (1.0 = 10,000).
    pub const fn as_fixed(self) -> u64 {
        self.0
    }

    /// Whether it is nothing at all (not even 0.0001).
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// `self - other`, or zero when `other` is larger.
    pub fn saturating_sub(self, other: ResourceAmount) -> ResourceAmount {
        ResourceAmount(self.0.saturating_sub(other.0))
    }

    /// `self + other`, or `None` above [`ResourceAmount::MAX`].
    pub fn checked_add(self, other: ResourceAmount) -> Option<ResourceAmount> {
        self.0.checked_add(other.0).map(ResourceAmount)
    }

    /// Converts a float amount (as written in a macro attribute or a resources file) with at
    /// most four decimals. Infinity and amounts above [`ResourceAmount::MAX`] (`1e400` reads as
    /// infinity) are out of range.
    pub fn from_f64(value: f64) -> Result<ResourceAmount, ResourceError> {
        if value > Self::MAX.as_f64() {
            // In exponent form: `1e300` written out would be 301 digits.
            return Err(ResourceError::OutOfRange { amount: format!("{value:e}"), max: Self::MAX });
        }
        value.to_string().parse()
    }

    /// The amount in whole units, rounded to the nearest `f64`.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::SCALE as f64
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
    /// A number too large for [`ResourceAmount::MAX`] (`99999999999999999999`, or `1e400`
    /// written with an exponent) is reported as out of range rather than as not a number.
    fn from_str(text: &str) -> Result<ResourceAmount, ResourceError> {
        let out_of_range = || ResourceError::OutOfRange { amount: text.to_string(), max: Self::MAX };
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && frac.is_empty() || !all_digits(whole) || !all_digits(frac) {
            // Not plain decimal digits; if it is still a number, say what is wrong with it.
            return Err(match text.parse::<f64>() {
                Ok(value) if value > Self::MAX.as_f64() => out_of_range(),
                _ => ResourceError::BadAmount(text.to_string()),
            });
        }
        if frac.len() > 4 {
            return Err(ResourceError::TooPrecise(text.to_string()));
        }
        // Only digits are left, so a failed parse is an overflow.
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| out_of_range())? };
        let mut frac_units: u64 =
            if frac.is_empty() { 0 } else { frac.parse().map_err(|_| out_of_range())? };
        for _ in frac.len()..4 {
            frac_units *= 10;
        }
        whole
            .checked_mul(Self::SCALE)
            .and_then(|w| w.checked_add(frac_units))
            .map(ResourceAmount)
            .ok_or_else(out_of_range)
    }
}

/// What can be wrong with a resource list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// The amount, as written, is not plain decimal digits (a sign, an exponent, a word).
    #[error("resource amount {0:?} is not a non-negative decimal number such as 4 or 0.5")]
    BadAmount(String),
    /// The amount is larger than [`ResourceAmount::MAX`].
    #[error("resource amount {amount} is out of range: the largest amount is {max}")]
    OutOfRange {
        /// The amount as written (in exponent form for a float).
        amount: String,
        /// [`ResourceAmount::MAX`].
        max: ResourceAmount,
    },
    /// The amount, as written, has more decimals than fixed point keeps.
    #[error("resource amount {0:?} has more than 4 decimals")]
    TooPrecise(String),
    /// An entry of a list, as written, has no `=`.
    #[error("resource entry {0:?} is not NAME=AMOUNT")]
    BadEntry(String),
    /// The name, as written, cannot be a resource's.
    #[error("resource name {0:?} is empty or contains ',', '=' or whitespace")]
    BadName(String),
    /// A list names this resource (canonical name) twice.
    #[error("resource {0:?} is given twice")]
    Duplicate(String),
}

/// A set of named amounts: what a node advertises, or what a task requests.
/// Zero amounts are not stored, so two equal sets compare equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Resources(BTreeMap<String, ResourceAmount>);

impl Resources {
    /// The empty set: nothing advertised, nothing requested.
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

    /// The amount of `name`, zero when absent. The name is looked up as stored, so ask for
    /// `CPU`, not `cpu`.
    pub fn get(&self, name: &str) -> ResourceAmount {
        self.0.get(name).copied().unwrap_or_default()
    }

    /// Whether `name` (as stored: `CPU`, not `cpu`) has a non-zero amount.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Whether no resource has a non-zero amount.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The non-zero amounts, by name in byte order.
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
    fn amounts_are_fixed_point_on_the_wire_and_decimal_in_json() {
        let resources = Resources::parse("CPU=2,adder=0.25").unwrap();
        let wire = rmp_serde::to_vec_named(&resources).unwrap();
        assert_eq!(rmp_serde::from_slice::<Resources>(&wire).unwrap(), resources);
        let json = serde_json::to_string(&resources).unwrap();
        assert_eq!(json, r#"{"CPU":2.0,"adder":0.25}"#);
        assert_eq!(serde_json::from_str::<Resources>(&json).unwrap(), resources);
        assert!(serde_json::from_str::<Resources>(r#"{"CPU":-1}"#).is_err());
    }

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
    fn amounts_too_large_are_out_of_range_not_malformed() {
        let max = ResourceAmount::MAX;
        assert_eq!(max.to_string(), "1844674407370955.1615");
        assert_eq!("1844674407370955.1615".parse::<ResourceAmount>(), Ok(max));
        for text in ["1844674407370955.1616", "99999999999999999999", "1e400", "1e30", "inf"] {
            let error = text.parse::<ResourceAmount>().expect_err(text);
            assert!(
                matches!(&error, ResourceError::OutOfRange { amount, .. } if amount == text),
                "{text}: {error:?}"
            );
            assert_eq!(
                error.to_string(),
                format!("resource amount {text} is out of range: the largest amount is {max}")
            );
        }
        // 1e400 as a float (a resources file, a call option) is infinity.
        let error = ResourceAmount::from_f64("1e400".parse().unwrap()).expect_err("infinity");
        assert!(matches!(error, ResourceError::OutOfRange { .. }), "{error:?}");
        assert!(error.to_string().contains("out of range"), "{error}");
        let error = ResourceAmount::from_f64(1e300).expect_err("too large");
        assert_eq!(error, ResourceError::OutOfRange { amount: "1e300".into(), max });
        // Negative numbers and NaN are still not amounts at all.
        for value in [-1.0, f64::NEG_INFINITY, f64::NAN] {
            assert!(matches!(ResourceAmount::from_f64(value), Err(ResourceError::BadAmount(_))), "{value}");
        }
        for text in ["-1", "-1e400", "1e3", "nan"] {
            assert!(matches!(text.parse::<ResourceAmount>(), Err(ResourceError::BadAmount(_))), "{text}");
        }
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
