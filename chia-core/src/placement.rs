//! Where a task may run beyond its resources: node labels a call asks for, a placement
//! strategy, and placement groups (bundles of resources reserved together on one node or on
//! distinct nodes, as in the original's colocated groups and Ray's placement groups).
//!
//! A worker offers [`Labels`] (`--labels rack=a,fpga=vu9p`); a call asks for labels, and the
//! scheduler places it only on a node that has every one of them with the same value. A
//! placement group ([`GroupSpec`]) reserves its bundles with a [`GroupStrategy`]; calls and
//! service instances run inside one bundle ([`BundleRef`]) and use only what it reserved.

use crate::ids::{SessionId, TaskId};
use crate::resources::Resources;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Labels a node offers or a call asks for: `key=value` pairs, keys unique. Keys and values are
/// 1 to [`Labels::MAX_LEN`] characters of ASCII letters, digits, `-`, `_`, `.` and `/`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

/// What can be wrong with a list of labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// An entry without `=`.
    #[error("label {0:?} is not KEY=VALUE")]
    BadEntry(String),
    /// A key that is empty, too long or has a character outside the allowed set.
    #[error("label key {0:?} must be 1 to 63 characters of ASCII letters, digits, '-', '_', '.' or '/'")]
    BadKey(String),
    /// A value that is empty, too long or has a character outside the allowed set.
    #[error(
        "label {key}={value:?}: the value must be 1 to 63 characters of ASCII letters, digits, '-', '_', '.' or '/'"
    )]
    BadValue {
        /// The label's key.
        key: String,
        /// The value as given.
        value: String,
    },
    /// The same key twice.
    #[error("label {0:?} is given twice")]
    Duplicate(String),
}

fn valid_label_text(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= Labels::MAX_LEN
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

impl Labels {
    /// The longest key or value.
    pub const MAX_LEN: usize = 63;

    /// No labels.
    pub fn new() -> Labels {
        Labels::default()
    }

    /// Parses `rack=a,fpga=vu9p` (an empty string is no labels).
    ///
    /// ```
    /// use chia_core::placement::Labels;
    /// let labels = Labels::parse("rack=a, fpga=vu9p").unwrap();
    /// assert_eq!(labels.get("fpga"), Some("vu9p"));
    /// assert!(Labels::parse("rack").is_err());
    /// assert!(Labels::parse("rack=a,rack=b").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Labels, LabelError> {
        let mut labels = Labels::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, value) =
                entry.split_once('=').ok_or_else(|| LabelError::BadEntry(entry.to_string()))?;
            let key = key.trim();
            if labels.0.contains_key(key) {
                return Err(LabelError::Duplicate(key.to_string()));
            }
            labels.insert(key, value.trim())?;
        }
        Ok(labels)
    }

    /// Sets `key` to `value`, replacing an earlier value of `key`.
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), LabelError> {
        if !valid_label_text(key) {
            return Err(LabelError::BadKey(key.to_string()));
        }
        if !valid_label_text(value) {
            return Err(LabelError::BadValue { key: key.to_string(), value: value.to_string() });
        }
        self.0.insert(key.to_string(), value.to_string());
        Ok(())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether these (a node's) labels have every label of `wanted` with the same value.
    pub fn satisfy(&self, wanted: &Labels) -> bool {
        wanted.iter().all(|(key, value)| self.get(key) == Some(value))
    }

    /// The labels of `wanted` these (a node's) do not have, each as `key=value (has key=other)`
    /// or `key=value (has none)`.
    pub fn missing(&self, wanted: &Labels) -> Vec<String> {
        wanted
            .iter()
            .filter(|&(key, value)| self.get(key) != Some(value))
            .map(|(key, value)| match self.get(key) {
                Some(other) => format!("{key}={value} (has {key}={other})"),
                None => format!("{key}={value} (has none)"),
            })
            .collect()
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(none)");
        }
        let mut first = true;
        for (key, value) in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

/// How the scheduler picks among the nodes that could take a call now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Strategy {
    /// Round-robin over the nodes that fit, per kind of call (what the scheduler always did).
    #[default]
    Default,
    /// The node running the fewest tasks: calls of a fan-out land on as many nodes as fit.
    Spread,
    /// The node running the most tasks: one node fills up before the next is used.
    Pack,
}

/// How a placement group's bundles are laid out on nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GroupStrategy {
    /// On one node if one has room for them all, else on as few as fit.
    Pack,
    /// All on one node, or not at all.
    StrictPack,
    /// On distinct nodes where possible, else sharing.
    Spread,
    /// Each bundle on its own node, or not at all.
    StrictSpread,
}

impl fmt::Display for GroupStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupStrategy::Pack => "PACK",
            GroupStrategy::StrictPack => "STRICT_PACK",
            GroupStrategy::Spread => "SPREAD",
            GroupStrategy::StrictSpread => "STRICT_SPREAD",
        })
    }
}

/// A placement group's id: the id of the request that created it, picked by its creator
/// (so creating one costs no round trip, and calls can name it at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(pub TaskId);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group-{}.{}", self.0.session().0, self.0.seq())
    }
}

/// Which bundle of a group a call runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BundleRef {
    /// The placement group.
    pub group: GroupId,
    /// The bundle's index; `None`: any bundle of the group with room.
    pub bundle: Option<u32>,
}

/// What a call or service instance asks of its node beyond resources. The default (no labels,
/// [`Strategy::Default`], no group) is sent as no placement at all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// Labels the node must have, with these values.
    #[serde(default)]
    pub labels: Labels,
    /// How to pick among the nodes that have room.
    #[serde(default)]
    pub strategy: Strategy,
    /// The bundle it runs in: it uses only what the bundle reserved, on the bundle's node.
    #[serde(default)]
    pub group: Option<BundleRef>,
}

impl Placement {
    /// Whether this asks nothing beyond resources.
    pub fn is_default(&self) -> bool {
        self.labels.is_empty() && self.strategy == Strategy::Default && self.group.is_none()
    }

    /// `None` for the default placement, so plain calls carry nothing.
    pub fn boxed(self) -> Option<Box<Placement>> {
        (!self.is_default()).then(|| Box::new(self))
    }
}

/// Why a placement group did not do what was asked of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum GroupProblem {
    /// The connected nodes could never hold its bundles as its strategy asks; it stays
    /// pending in case a node that can joins.
    #[error("cannot be placed: {reason}")]
    Infeasible {
        /// Why, in words: what its strategy needs and what the nodes can give.
        reason: String,
    },
    /// It was removed (by its creator, or with its job), and its reservations with it.
    #[error("was removed")]
    Removed,
    /// The head knows no group of this id (never created, or removed).
    #[error("is not known to the head (never created, or removed)")]
    Unknown,
    /// A call named a bundle the group does not have.
    #[error("has no bundle {bundle} (it has {bundles})")]
    NoSuchBundle {
        /// The index the call named.
        bundle: u32,
        /// How many bundles the group has.
        bundles: u32,
    },
    /// A call requests more than its bundle (or, with any bundle, every bundle) reserves.
    #[error("{function} requests {request}, more than {which} reserves")]
    TooSmall {
        /// The function called.
        function: String,
        /// The call's request, as a resource list.
        request: String,
        /// The bundle that is too small, with what it reserves (or "any of its bundles").
        which: String,
    },
}

/// The most bundles one group may have.
pub const MAX_BUNDLES: usize = 256;

/// The prefix of the resources a group's bundles offer on their nodes; no worker may offer,
/// and no bundle reserve, a resource of this name.
pub const GROUP_PREFIX: &str = "group:";

/// A request to create a placement group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// The new group's id: the creating request's task id, of the creating session.
    pub group: GroupId,
    /// What each bundle reserves, in order; calls name a bundle by its index.
    pub bundles: Vec<Resources>,
    /// How the bundles are laid out on nodes.
    pub strategy: GroupStrategy,
    /// Outlives its job (until removed); otherwise it is removed when its job ends.
    #[serde(default)]
    pub detached: bool,
    /// The job it belongs to when created from inside a task (see `TaskSpec::job`).
    #[serde(default)]
    pub job: Option<SessionId>,
}

impl GroupSpec {
    /// Checks what the head checks: at least one bundle and at most [`MAX_BUNDLES`], none
    /// empty, none reserving a `group:` or `node:` resource.
    pub fn validate(&self) -> Result<(), String> {
        if self.bundles.is_empty() {
            return Err("a placement group needs at least one bundle".into());
        }
        if self.bundles.len() > MAX_BUNDLES {
            return Err(format!(
                "{} bundles are more than the {MAX_BUNDLES} a group may have",
                self.bundles.len()
            ));
        }
        for (index, bundle) in self.bundles.iter().enumerate() {
            if bundle.is_empty() {
                return Err(format!("bundle {index} reserves nothing (give it CPU or another resource)"));
            }
            if let Some((name, _)) = bundle.iter().find(|(name, _)| {
                name.starts_with(GROUP_PREFIX) || name.starts_with(crate::resources::NODE_PREFIX)
            }) {
                return Err(format!("bundle {index} reserves {name}, a resource no bundle may reserve"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_strictly_and_match_by_value() {
        let node = Labels::parse("rack=a,fpga=vu9p").unwrap();
        assert!(node.satisfy(&Labels::parse("fpga=vu9p").unwrap()));
        assert!(node.satisfy(&Labels::new()));
        let wanted = Labels::parse("fpga=ku115,zone=eu").unwrap();
        assert!(!node.satisfy(&wanted));
        assert_eq!(node.missing(&wanted), ["fpga=ku115 (has fpga=vu9p)", "zone=eu (has none)"]);
        assert_eq!(node.to_string(), "fpga=vu9p,rack=a");
        assert_eq!(Labels::parse("a=b,a=c"), Err(LabelError::Duplicate("a".into())));
        assert_eq!(Labels::parse("a"), Err(LabelError::BadEntry("a".into())));
        assert_eq!(Labels::parse("a b=c"), Err(LabelError::BadKey("a b".into())));
        assert_eq!(Labels::parse("a="), Err(LabelError::BadValue { key: "a".into(), value: String::new() }));
        assert!(Labels::parse(&format!("k={}", "v".repeat(64))).is_err());
        assert_eq!(Labels::parse(" ").unwrap(), Labels::new());
    }

    #[test]
    fn default_placement_is_sent_as_none() {
        assert!(Placement::default().boxed().is_none());
        let spread = Placement { strategy: Strategy::Spread, ..Placement::default() };
        assert!(spread.boxed().is_some());
    }

    #[test]
    fn group_specs_are_checked() {
        let spec = |bundles: &[&str]| GroupSpec {
            group: GroupId(TaskId(1)),
            bundles: bundles.iter().map(|b| Resources::parse(b).unwrap()).collect(),
            strategy: GroupStrategy::Pack,
            detached: false,
            job: None,
        };
        assert!(spec(&["CPU=1"]).validate().is_ok());
        assert!(spec(&[]).validate().unwrap_err().contains("at least one"));
        assert!(spec(&["CPU=1", ""]).validate().unwrap_err().contains("bundle 1 reserves nothing"));
        assert!(spec(&["group:1:CPU=1"]).validate().unwrap_err().contains("group:1:CPU"));
    }
}
