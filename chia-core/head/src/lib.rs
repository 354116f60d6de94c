//! `chia-head-core` owns every decision the head makes, with no I/O: it depends on no async
//! runtime, socket, TLS or file crate (CI checks its `cargo tree`).
//!
//! - [`HeadCore`]: sessions and jobs, task records, results and their refcounts, the service
//!   registry and call routing, service restarts, job settings and result watches — one state
//!   machine shaped like quinn-proto: inputs with the time passed in
//!   ([`HeadCore::open_session`], [`HeadCore::handle`], [`HeadCore::close_session`],
//!   [`HeadCore::handle_timeout`]), an outbox of [`Action`]s (encoded frames to send,
//!   connections to close, state to keep) and a timer deadline ([`HeadCore::poll_timeout`]) out.
//! - [`scheduler`]: the placement state machine inside it (which task runs on which node).
//! - [`journal`]: which inputs the head keeps ([`Action::Keep`]), and [`HeadCore::recover`],
//!   which rebuilds a head from them after a restart while the previous run's peers take up
//!   their sessions again; [`HeadCore::snapshot`] writes the whole state as one record, from
//!   which a journal starts again (compaction).
//! - [`observe`]: the answers to `chia status`, `list`, `show`, `explain` and `cancel`, the
//!   stuck-task watchdog and the figures of the metrics endpoint ([`HeadCore::metrics`]),
//!   from counts kept as tasks move.
//! - [`PersistedService`]: what the head keeps of a detached service to start it again.
//!
//! The runtime's head (`chia_runtime::head`) is the thin driver around it: it accepts and
//! authenticates QUIC connections, decodes frames, feeds the core and carries out its actions.

// What a peer sends must never make the head panic. `expect` stays allowed, for the few
// invariants that make a `None` impossible (each says which).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod core;
mod groups;
mod inspect;
pub mod journal;
pub mod observe;
mod outbox;
mod persist;
#[cfg(test)]
mod planted;
pub mod scheduler;
mod services;
pub mod sim;
mod snapshot;

pub use crate::core::{CoreOptions, HeadCore, HeadStats, INLINE_RESULT_BYTES, Rejection};
pub use journal::{JournalEntry, Recovery};
pub use outbox::{Action, OwnNodeCall};
pub use persist::PersistedService;
pub use snapshot::SnapshotError;
