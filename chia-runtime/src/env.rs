//! Where a chia program finds its cluster: the environment variables it reads and the head's
//! default state directory.

use std::path::PathBuf;

/// `host:port` of the head (overrides the address in the cluster file).
pub const ADDRESS: &str = "CHIA_ADDRESS";
/// Path of the cluster file the head wrote (`<state dir>/cluster.yaml`).
pub const CLUSTER_FILE: &str = "CHIA_CLUSTER_FILE";
/// The head's state directory (default `~/.chia`).
pub const STATE_DIR: &str = "CHIA_STATE_DIR";
/// Embedded cluster: number of workers.
pub const LOCAL_WORKERS: &str = "CHIA_LOCAL_WORKERS";
/// Embedded cluster: resources of each worker, e.g. `demo=1,adder=2`.
pub const LOCAL_RESOURCES: &str = "CHIA_LOCAL_RESOURCES";

/// The default state directory of a head: `$CHIA_STATE_DIR`, else `~/.chia`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATE_DIR) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".chia")
}
