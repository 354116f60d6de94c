//! What a head keeps of a detached service so that a restarted head can start it again: its
//! type, name, resources and constructor arguments. The core says when the set changes
//! ([`crate::Action::SaveServices`]); the driver stores it.

use chia_core::protocol::{Arg, ServiceStart};
use chia_core::{FunctionKey, Resources, Retries};
use serde::{Deserialize, Serialize};

/// A detached service as it was started: enough to start it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedService {
    /// The service type, name and signature, as in [`ServiceStart::service_type`].
    pub service_type: FunctionKey,
    /// The name it was started under.
    pub name: String,
    /// The namespace of its name.
    pub namespace: String,
    /// What the instance holds on its node.
    pub request: Resources,
    /// The constructor's arguments, encoded.
    #[serde(with = "values")]
    pub args: Vec<Vec<u8>>,
    /// How often it may be re-created on another node when its node is lost.
    #[serde(default)]
    pub max_restarts: Retries,
    /// Labels its node must have, the placement-group bundle it lives in.
    #[serde(default)]
    pub placement: Option<Box<chia_core::placement::Placement>>,
}

impl PersistedService {
    /// The specification of `start`, if it can be persisted: detached, and every argument a value
    /// (a ref names a result that will not exist after a restart).
    pub fn of(start: &ServiceStart) -> Option<PersistedService> {
        if !start.detached {
            return None;
        }
        PersistedService::from_values(start)
    }

    /// The specification of `start` if every argument is a value, so it can be started again
    /// without the tasks the refs name.
    pub fn from_values(start: &ServiceStart) -> Option<PersistedService> {
        let args = start
            .args
            .iter()
            .map(|arg| match arg {
                Arg::Value(value) => Some(value.clone()),
                Arg::Ref(_) => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PersistedService {
            service_type: start.service_type.clone(),
            name: start.name.clone(),
            namespace: start.namespace.clone(),
            request: start.request.clone(),
            args,
            max_restarts: start.max_restarts,
            placement: start.placement.clone(),
        })
    }

    /// A start request for this service, answered to nobody (`task` is the head's own).
    pub fn start(&self, task: chia_core::TaskId) -> ServiceStart {
        ServiceStart {
            task,
            service_type: self.service_type.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            detached: true,
            get_if_exists: true,
            request: self.request.clone(),
            args: self.args.iter().cloned().map(Arg::Value).collect(),
            max_restarts: self.max_restarts,
            placement: self.placement.clone(),
        }
    }
}

/// Byte vectors as binary blobs rather than arrays of numbers.
mod values {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(values: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        values.iter().map(|v| serde_bytes::Bytes::new(v)).collect::<Vec<_>>().serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Ok(Vec::<serde_bytes::ByteBuf>::deserialize(deserializer)?
            .into_iter()
            .map(|b| b.into_vec())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(name: &str, detached: bool, args: Vec<Arg>) -> ServiceStart {
        ServiceStart {
            task: chia_core::TaskId(1),
            service_type: FunctionKey::new("chia.Cache", "0123456789abcdef"),
            name: name.into(),
            namespace: "default".into(),
            detached,
            get_if_exists: false,
            request: Resources::parse("node:head=0.001").unwrap(),
            args,
            max_restarts: Retries::Never,
            placement: None,
        }
    }

    #[test]
    fn only_detached_services_with_value_arguments_are_persisted() {
        assert!(PersistedService::of(&start("a", false, vec![])).is_none());
        assert!(PersistedService::of(&start("a", true, vec![Arg::Ref(chia_core::TaskId(3))])).is_none());
        let persisted = PersistedService::of(&start("a", true, vec![Arg::Value(vec![1, 2])])).unwrap();
        let again = persisted.start(chia_core::TaskId(9));
        assert!(again.detached && again.get_if_exists);
        assert_eq!(again.args, vec![Arg::Value(vec![1, 2])]);
    }
}
