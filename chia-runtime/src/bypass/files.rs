//! The job's file server: a service pinned to the head node that reads the `data:` files of
//! the job's bypass configuration, so workers on other machines need no shared filesystem.
//! It serves exactly those files; it is not a way to read arbitrary files of the head.

use crate::Bytes;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Directories of this process that no file server reads, whatever its allow-list says: the
/// head's state directory (its CA key and credentials).
static PROTECTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Keeps the file server out of `dir` (and everything under it) in this process.
pub(crate) fn protect(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    PROTECTED.lock().unwrap_or_else(|p| p.into_inner()).push(dir);
}

/// Why `path` may not be served even though the configuration names it, if it may not.
fn refusal(path: &str) -> Option<String> {
    let real = Path::new(path).canonicalize().ok()?;
    if PROTECTED.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|dir| real.starts_with(dir)) {
        return Some(format!("{path} is in the head's state directory, which is never served"));
    }
    match std::fs::metadata(&real) {
        Ok(meta) if !meta.is_file() => Some(format!("{path} is not a regular file")),
        _ => None,
    }
}

/// The file server instance: the paths it may read.
pub struct BypassFiles {
    allowed: BTreeSet<String>,
}

#[chia::service(name = "chia.BypassFiles", concurrent)]
impl BypassFiles {
    /// Serves `allowed` (the configuration's `data:` paths, as written there).
    pub fn new(allowed: Vec<String>) -> Self {
        BypassFiles { allowed: allowed.into_iter().collect() }
    }

    /// The bytes of `path`; an error names the path when it is not a `data:` file of the
    /// configuration or cannot be read.
    pub fn read(&self, path: String) -> Result<Bytes, String> {
        if !self.allowed.contains(&path) {
            return Err(format!(
                "{path} is not a `data:` file of the job's bypass configuration; the file server reads only those"
            ));
        }
        if let Some(refusal) = refusal(&path) {
            return Err(refusal);
        }
        std::fs::read(&path).map(Bytes::from).map_err(|e| format!("cannot read {path} on the head node: {e}"))
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
        protect(protected.path());
        let server = BypassFiles::new(vec![secret.display().to_string(), data.display().to_string()]);
        let refused = server.read(secret.display().to_string()).unwrap_err();
        assert!(refused.contains("state directory"), "{refused}");
        // Through a symbolic link it is the same file.
        let link = open.path().join("innocent.md");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let server = BypassFiles::new(vec![link.display().to_string()]);
        assert!(server.read(link.display().to_string()).is_err());
        let served = BypassFiles::new(vec![data.display().to_string()]).read(data.display().to_string());
        assert_eq!(served.unwrap().into_vec(), b"ipc: 1.7");
    }
}
