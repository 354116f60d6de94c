//! How a [`crate::CacheStore`] trades write latency for durability.

use serde::{Deserialize, Serialize};

/// When a write is forced to stable storage. Whatever the choice, a write is crash-consistent:
/// it goes to a temporary file that is renamed into place when complete, and every entry
/// carries checksums, so a crash or power loss can lose entries but never expose a partial or
/// wrong one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Durability {
    /// No fsync. A killed process loses nothing that `write` returned for (the kernel has it);
    /// a power loss may lose recent entries, and may leave damaged files that reads then treat
    /// as misses.
    None,
    /// fsync the file before renaming it into place: after a power loss an entry is complete
    /// or absent, but the last renames before it may be lost.
    Data,
    /// fsync the file, rename, then fsync the directory: once `write` returns `Ok(true)` the
    /// entry survives a power loss. The default: cached values are outputs of expensive tasks
    /// (builds, simulations) that take far longer than two fsyncs, and the cache exists so
    /// reruns do not repeat them.
    #[default]
    Full,
}

/// Options of [`crate::CacheStore::open`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreOptions {
    /// How far each write is synced to disk before it counts as done (default `Full`).
    pub durability: Durability,
}

impl StoreOptions {
    /// These options with `durability` instead.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
}
