//! `chia-core` owns the plain data every chia process agrees on, with no I/O:
//!
//! - [`ids`]: typed ids for tasks, nodes and sessions;
//! - [`resources`]: fixed-point resource amounts and resource sets (`adder=4,CPU=2`);
//! - [`protocol`]: the versioned, length-capped, named-field MessagePack wire protocol;
//! - [`error`]: the errors a task can end with, as they travel on the wire;
//! - [`function`]: what identifies a remote function (name + signature hash) and its scheduling options;
//! - [`tags`]: tag patterns that match a whole call tag (cache, bypass and result-watch rules);
//! - [`inspect`]: the questions `chia status`, `list`, `show` and `explain` ask the head, and its answers;
//! - [`names`]: the closest known name to a misspelt one, for "did you mean …?" messages;
//! - [`placement`]: node labels, placement strategies and placement groups.
//!
//! The runtime (`chia-runtime`) builds the head, workers and drivers on top of these types;
//! nothing here knows about sockets, threads or time.

pub mod error;
pub mod function;
pub mod ids;
pub mod inspect;
pub mod names;
pub mod placement;
pub mod protocol;
pub mod resources;
pub mod retries;
pub mod tags;

pub use error::TaskError;
pub use function::{FunctionKey, signature_hash};
pub use ids::{NodeId, ServiceId, SessionId, TaskId};
pub use resources::{ResourceAmount, ResourceError, Resources};
pub use retries::Retries;
pub use tags::TagPatterns;

/// The node name the head reserves for its own node (services pinned with `node:head`).
pub const HEAD_NODE_NAME: &str = "head";
