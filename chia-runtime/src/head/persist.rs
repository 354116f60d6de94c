//! What a head keeps across restarts besides its credentials: the specifications of the
//! detached services running on the cluster (the cache, at least), so a restarted head starts
//! them again — the cache warm-starts from its directory and keeps its entries.
//!
//! One MessagePack file, `<state dir>/services.msgpack`, rewritten whole (temp file, fsync,
//! rename) whenever the set changes; a file that cannot be read is reported and ignored (the
//! services it named are not restarted, nothing else is affected).

use chia_core::protocol::{Arg, ServiceStart};
use chia_core::{FunctionKey, Resources};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "services.msgpack";

/// Bumped when the file's layout changes incompatibly.
const FORMAT_VERSION: u32 = 1;

/// A detached service as it was started: enough to start it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PersistedService {
    pub service_type: FunctionKey,
    pub name: String,
    pub namespace: String,
    pub request: Resources,
    /// The constructor's arguments, encoded.
    #[serde(with = "values")]
    pub args: Vec<Vec<u8>>,
    #[serde(default)]
    pub max_restarts: i32,
}

#[derive(Serialize, Deserialize)]
struct ServicesFile {
    version: u32,
    services: Vec<PersistedService>,
}

impl PersistedService {
    /// The specification of `start`, if it can be persisted: detached, and every argument a value
    /// (a ref names a result that will not exist after a restart).
    pub(crate) fn of(start: &ServiceStart) -> Option<PersistedService> {
        if !start.detached {
            return None;
        }
        PersistedService::from_values(start)
    }

    /// The specification of `start` if every argument is a value, so it can be started again
    /// without the tasks the refs name.
    pub(crate) fn from_values(start: &ServiceStart) -> Option<PersistedService> {
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
        })
    }

    /// A start request for this service, answered to nobody (`task` is the head's own).
    pub(crate) fn start(&self, task: chia_core::TaskId) -> ServiceStart {
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
        }
    }
}

/// The persisted services of a state directory, by (namespace, name).
pub(crate) struct ServiceStore {
    path: PathBuf,
    services: BTreeMap<(String, String), PersistedService>,
}

impl ServiceStore {
    /// Opens the store in `state_dir`, reading what a previous head left there.
    pub(crate) fn open(state_dir: &Path) -> ServiceStore {
        let path = state_dir.join(FILE_NAME);
        let services = match std::fs::read(&path) {
            Ok(bytes) => match rmp_serde::from_slice::<ServicesFile>(&bytes) {
                Ok(file) if file.version == FORMAT_VERSION => file.services,
                Ok(file) => {
                    tracing::error!(
                        "{}: format version {} is not {FORMAT_VERSION}; its services are not restarted",
                        path.display(),
                        file.version
                    );
                    Vec::new()
                }
                Err(e) => {
                    tracing::error!("{}: unreadable ({e}); its services are not restarted", path.display());
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::error!("cannot read {}: {e}; its services are not restarted", path.display());
                Vec::new()
            }
        };
        let services = services.into_iter().map(|s| ((s.namespace.clone(), s.name.clone()), s)).collect();
        ServiceStore { path, services }
    }

    pub(crate) fn services(&self) -> impl Iterator<Item = &PersistedService> {
        self.services.values()
    }

    /// Records a running detached service (replacing one of the same name).
    pub(crate) fn insert(&mut self, service: PersistedService) {
        let key = (service.namespace.clone(), service.name.clone());
        if self.services.get(&key) != Some(&service) {
            self.services.insert(key, service);
            self.save();
        }
    }

    /// Forgets a service that was stopped or lost.
    pub(crate) fn remove(&mut self, namespace: &str, name: &str) {
        if self.services.remove(&(namespace.to_string(), name.to_string())).is_some() {
            self.save();
        }
    }

    fn save(&self) {
        if let Err(e) = self.write() {
            tracing::error!(
                "cannot save {}: {e}; a head restart would not restart its services",
                self.path.display()
            );
        }
    }

    fn write(&self) -> std::io::Result<()> {
        let file =
            ServicesFile { version: FORMAT_VERSION, services: self.services.values().cloned().collect() };
        let bytes = rmp_serde::to_vec_named(&file).map_err(std::io::Error::other)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut temp = tempfile::NamedTempFile::new_in(dir)?;
        temp.write_all(&bytes)?;
        temp.as_file().sync_all()?;
        temp.persist(&self.path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
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
            max_restarts: 0,
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

    #[test]
    fn the_store_survives_a_reopen_and_forgets_removed_services() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ServiceStore::open(dir.path());
        store.insert(PersistedService::of(&start("cache", true, vec![Arg::Value(vec![7; 100])])).unwrap());
        store.insert(PersistedService::of(&start("other", true, vec![])).unwrap());
        store.remove("default", "other");
        let reopened = ServiceStore::open(dir.path());
        let names: Vec<&str> = reopened.services().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cache"]);
        assert_eq!(reopened.services().next().unwrap().args, vec![vec![7; 100]]);
    }

    #[test]
    fn an_unreadable_file_restarts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"\xc1 not messagepack").unwrap();
        assert_eq!(ServiceStore::open(dir.path()).services().count(), 0);
    }
}
