//! Compaction: the head's whole state as one journal record, so the journal can start again
//! from it instead of growing without end.
//!
//! A snapshot keeps what replaying the journal up to it would rebuild (the core is
//! deterministic, so that is its state between two inputs) and nothing a replay does not
//! rebuild either: the options, the outbox, and what is about time or peers — when nodes
//! were last heard, sessions waiting to be taken up and the frames held for them. Restoring
//! one is like the end of a replay: every session waits for its peer again.

use crate::core::{CoreOptions, HeadCore};
use crate::journal::JournalEntry;
use std::cell::Cell;
use std::time::Instant;

thread_local! {
    /// The time a snapshot being decoded on this thread is restored at.
    static RESTORED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time given to what a snapshot does not keep (when nodes were last heard). Only
/// [`HeadCore::restore`] decodes snapshots, and it sets the time first.
pub(crate) fn restored_at() -> Instant {
    RESTORED_AT.with(Cell::get).expect("a snapshot is decoded only by HeadCore::restore, which sets its time")
}

/// A snapshot that cannot be read back: written by another version of the head.
#[derive(Debug, thiserror::Error)]
#[error("the journal's snapshot cannot be read ({0}); was it written by another version of chia-head?")]
pub struct SnapshotError(#[from] rmp_serde::decode::Error);

impl HeadCore {
    /// The head's state as a journal record that replaces every record before it. `None` if it
    /// cannot be encoded (it always can: every part of it is plain data), logged.
    pub fn snapshot(&self) -> Option<JournalEntry> {
        match rmp_serde::to_vec_named(self) {
            Ok(state) => Some(JournalEntry::Snapshot { state: serde_bytes::ByteBuf::from(state) }),
            Err(e) => {
                tracing::error!("the head's state cannot be written as a snapshot: {e}");
                None
            }
        }
    }

    /// A head whose state is `state` (from [`HeadCore::snapshot`]), at `now`.
    pub(crate) fn restore(
        now: Instant,
        options: CoreOptions,
        state: &[u8],
    ) -> Result<HeadCore, SnapshotError> {
        let previous = RESTORED_AT.with(|at| at.replace(Some(now)));
        let decoded = rmp_serde::from_slice::<HeadCore>(state);
        RESTORED_AT.with(|at| at.set(previous));
        let mut core = decoded?;
        core.scheduler.fill_in_older_snapshot();
        core.scheduler.recount();
        // What replays after the snapshot is numbered after what it holds.
        core.recount();
        core.persisted = match (options.keep_services, core.persisted.take()) {
            (true, kept) => Some(kept.unwrap_or_default()),
            (false, _) => None,
        };
        core.options = options;
        Ok(core)
    }
}
