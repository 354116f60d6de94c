//! The job's file server: a service pinned to the head node that reads the `data:` files of
//! the job's bypass configuration, so workers on other machines need no shared filesystem.
//! It serves exactly those files; it is not a way to read arbitrary files of the head, and
//! never reads the directories its node protects (the head's state directory, given to the
//! head's node when it joins: see [`Worker::connect_head_node`](crate::worker::Worker::connect_head_node)).

use crate::driver::context::Context;
use serde_bytes::ByteBuf as Bytes;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The file server instance: the paths it may read, and the directories it never reads.
pub struct BypassFiles {
    allowed: BTreeSet<String>,
    /// Canonical paths of the node's protected directories.
    protected: Vec<PathBuf>,
}

#[chia::service(name = "chia.BypassFiles", concurrent)]
impl BypassFiles {
    /// Serves `allowed` (the configuration's `data:` paths, as written there), never from the
    /// directories the hosting node protects.
    pub fn new(cx: &Context, allowed: Vec<String>) -> Self {
        BypassFiles::serving(allowed, cx.protected_dirs())
    }

    /// The bytes of `path`; an error names the path when it is not a `data:` file of the
    /// configuration or cannot be read.
    pub fn read(&self, path: String) -> Result<Bytes, String> {
        if !self.allowed.contains(&path) {
            return Err(format!(
                "{path} is not a `data:` file of the job's bypass configuration; the file server reads only those"
            ));
        }
        if let Some(refusal) = self.refusal(&path) {
            return Err(refusal);
        }
        std::fs::read(&path).map(Bytes::from).map_err(|e| format!("cannot read {path} on the head node: {e}"))
    }
}

impl BypassFiles {
    fn serving(allowed: Vec<String>, protected: &[PathBuf]) -> BypassFiles {
        let protected =
            protected.iter().map(|dir| dir.canonicalize().unwrap_or_else(|_| dir.clone())).collect();
        BypassFiles { allowed: allowed.into_iter().collect(), protected }
    }

    /// Why `path` may not be served even though the configuration names it, if it may not.
    fn refusal(&self, path: &str) -> Option<String> {
        let real = Path::new(path).canonicalize().ok()?;
        if self.protected.iter().any(|dir| real.starts_with(dir)) {
            return Some(format!("{path} is in the head's state directory, which is never served"));
        }
        match std::fs::metadata(&real) {
            Ok(meta) if !meta.is_file() => Some(format!("{path} is not a regular file")),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protected_directory_is_never_served_and_other_files_are() {
        let protected = tempfile::tempdir().unwrap();
        let secret = protected.path().join("head-credentials.yaml");
        std::fs::write(&secret, "ca key").unwrap();
        let open = tempfile::tempdir().unwrap();
        let data = open.path().join("perf.md");
        std::fs::write(&data, "ipc: 1.7").unwrap();
        let protect = [protected.path().to_path_buf()];
        let server =
            BypassFiles::serving(vec![secret.display().to_string(), data.display().to_string()], &protect);
        let refused = server.read(secret.display().to_string()).unwrap_err();
        assert!(refused.contains("state directory"), "{refused}");
        // Through a symbolic link it is the same file.
        let link = open.path().join("innocent.md");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let server = BypassFiles::serving(vec![link.display().to_string()], &protect);
        assert!(server.read(link.display().to_string()).is_err());
        let served =
            BypassFiles::serving(vec![data.display().to_string()], &protect).read(data.display().to_string());
        assert_eq!(served.unwrap().into_vec(), b"ipc: 1.7");
    }
}
