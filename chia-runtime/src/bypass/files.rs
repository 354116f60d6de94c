//! The job's file server: a service pinned to the head node that reads the `data:` files of
//! the job's bypass configuration, so workers on other machines need no shared filesystem.
//! It serves exactly those files; it is not a way to read arbitrary files of the head.

use crate::Bytes;
use std::collections::BTreeSet;

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
        std::fs::read(&path).map(Bytes::from).map_err(|e| format!("cannot read {path} on the head node: {e}"))
    }
}
