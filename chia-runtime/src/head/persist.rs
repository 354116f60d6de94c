//! What a head keeps across restarts besides its credentials: the specifications of the
//! detached services running on the cluster (the cache, at least), so a restarted head starts
//! them again — the cache warm-starts from its directory and keeps its entries.
//!
//! One MessagePack file, `<state dir>/services.msgpack`, rewritten whole (temp file, fsync,
//! rename, directory fsync) whenever the head core says the set changed
//! ([`chia_head_core::Action::SaveServices`]); a file that cannot be read is reported and
//! ignored (the services it named are not restarted, nothing else is affected).

use chia_head_core::PersistedService;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "services.msgpack";

/// Bumped when the file's layout changes incompatibly.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct ServicesFile {
    version: u32,
    services: Vec<PersistedService>,
}

/// The services file of a state directory.
pub(crate) struct ServiceFile {
    path: PathBuf,
}

impl ServiceFile {
    pub(crate) fn in_dir(state_dir: &Path) -> ServiceFile {
        ServiceFile { path: state_dir.join(FILE_NAME) }
    }

    /// What a previous head left there; nothing (with an error logged) if it cannot be read.
    pub(crate) fn read(&self) -> Vec<PersistedService> {
        let path = &self.path;
        match std::fs::read(path) {
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
        }
    }

    /// Replaces the file's contents with `services`, durably; a failure is logged.
    pub(crate) fn save(&self, services: Vec<PersistedService>) {
        if let Err(e) = self.write(services) {
            tracing::error!(
                "cannot save {}: {e}; a head restart would not restart its services",
                self.path.display()
            );
        }
    }

    fn write(&self, services: Vec<PersistedService>) -> std::io::Result<()> {
        let file = ServicesFile { version: FORMAT_VERSION, services };
        let bytes = rmp_serde::to_vec_named(&file).map_err(std::io::Error::other)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut temp = tempfile::NamedTempFile::new_in(dir)?;
        temp.write_all(&bytes)?;
        temp.as_file().sync_all()?;
        temp.persist(&self.path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chia_core::protocol::{Arg, ServiceStart};
    use chia_core::{FunctionKey, Resources, TaskId};

    fn cache(name: &str, args: Vec<Arg>) -> PersistedService {
        let start = ServiceStart {
            task: TaskId(1),
            service_type: FunctionKey::new("chia.Cache", "0123456789abcdef"),
            name: name.into(),
            namespace: "default".into(),
            detached: true,
            get_if_exists: false,
            request: Resources::parse("node:head=0.001").unwrap(),
            args,
            max_restarts: chia_core::Retries::Never,
            placement: None,
        };
        PersistedService::of(&start).unwrap()
    }

    #[test]
    fn the_file_survives_a_reopen_and_holds_the_latest_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = ServiceFile::in_dir(dir.path());
        file.save(vec![cache("cache", vec![Arg::Value(vec![7; 100])]), cache("other", vec![])]);
        file.save(vec![cache("cache", vec![Arg::Value(vec![7; 100])])]);
        let reopened = ServiceFile::in_dir(dir.path()).read();
        let names: Vec<&str> = reopened.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cache"]);
        assert_eq!(reopened[0].args, vec![vec![7; 100]]);
    }

    #[test]
    fn an_unreadable_file_restarts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"\xc1 not messagepack").unwrap();
        assert!(ServiceFile::in_dir(dir.path()).read().is_empty());
    }
}
