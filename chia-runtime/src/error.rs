//! The error a user sees from `get`, `wait` and `init`.

use chia_core::{SessionId, TaskError, TaskId};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything a call into the runtime can fail with. Match on the kind you handle and keep a
/// `_` arm: new kinds may be added.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task ran (or was rejected) and failed; the inner error names the function.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// `get` gave up waiting. When no node could run the task, `infeasible` says why.
    #[error("{task} did not finish within {waited:?}{}", infeasible_note(.infeasible))]
    Timeout { task: TaskId, waited: Duration, infeasible: Option<String> },
    /// The value arrived but is not of the type the `ObjectRef` expects.
    #[error("the result of {task} could not be decoded as {type_name}: {message}")]
    Decode { task: TaskId, type_name: &'static str, message: String },
    /// The connection to the head ended before the result arrived.
    #[error("lost the connection to the head: {0}")]
    Disconnected(String),
    /// Connecting to or starting the cluster failed.
    #[error("{0}")]
    Setup(String),
    /// A value could not be encoded (MessagePack) to be sent: `what` names it.
    #[error("{what} could not be encoded: {message}")]
    Encode { what: String, message: String },
    /// A blocking call (`get_blocking`, `remote_blocking`) was made on a current-thread tokio
    /// runtime, where it would wait forever for the thread it blocks.
    #[error("a blocking chia call was made on a current-thread tokio runtime; use `.await` instead")]
    BlockingOnCurrentThread,
    /// A saved bypass names a provider or condition that is not linked into this binary.
    #[error(
        "the saved bypass names the {kind} {name} for {function}, which is not linked into this binary; define it with #[chia::{kind}] in a crate this binary links"
    )]
    NotLinked { kind: &'static str, name: String, function: String },
    /// A bypass provider could not read the recorded data of `function`.
    #[error("bypass data of {function}: {message}")]
    BypassData { function: String, message: String },
    /// The cache's budget is invalid, or its store could not be opened.
    #[error(transparent)]
    Cache(Arc<chia_cache::CacheError>),
    /// The `cache:` or `bypass:` section of the YAML file could not be loaded; the error names
    /// the section, the file, and where known the line and function.
    #[error(transparent)]
    Config(Arc<chia_cache::SectionError>),
    /// `start_cache` found a cache already running with another directory or budget.
    #[error(
        "a cache is already running in {} with a budget of {}; start_cache asked for {} with {}. \
         Pass the same directory and budget to use it, or stop it (stop_cache) to start another",
        running_dir.display(),
        describe_bytes(*running_budget),
        requested_dir.display(),
        describe_bytes(*requested_budget)
    )]
    CacheConflict { running_dir: PathBuf, running_budget: u64, requested_dir: PathBuf, requested_budget: u64 },
    /// A `Bypass` was created on a context that is not a driver's: inside a task (`function`,
    /// of `job`), inside a service's constructor or method, or on a worker's own connection.
    /// A job's bypass is its driver's alone, so it is refused there rather than applied.
    #[error(
        "Bypass can be created only by a driver, not {}: a bypass belongs to its driver's job, and every task of the job \
         follows it, nested calls included; create it in the driver, before the calls it should cover",
        bypass_place(.node, .task, .function, .job)
    )]
    BypassOutsideDriver {
        node: String,
        task: Option<TaskId>,
        function: Option<String>,
        job: Option<SessionId>,
    },
    /// The key/value store (`chia::kv`) refused a key or value, or cannot use its file.
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// What the key/value store ([`chia::kv`](crate::kv)) refuses or cannot do. Keys and paths are
/// named; a key is shown escaped, and cut after 80 characters.
///
/// It travels from the store's service to the caller as a value, so it is serializable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum KvError {
    /// The key is empty, too long or holds a control character.
    #[error("kv key {} is not valid: {reason}", shown_key(.key))]
    BadKey { key: String, reason: String },
    /// The encoded value is larger than a value may be.
    #[error("the value for kv key {} is {bytes} bytes encoded; a value may have at most {limit}", shown_key(.key))]
    ValueTooLarge { key: String, bytes: u64, limit: u64 },
    /// Storing the value would take the store past its bound on keys or bytes.
    #[error("the kv store is full, so {} was not set: {reason}", shown_key(.key))]
    StoreFull { key: String, reason: String },
    /// The stored value is not of the type asked for.
    #[error("kv key {} does not hold a {expected}: {message}", shown_key(.key))]
    WrongType { key: String, expected: String, message: String },
    /// The value could not be encoded (its `Serialize` failed).
    #[error("the value for kv key {} (a {type_name}) could not be encoded: {message}", shown_key(.key))]
    Encode { key: String, type_name: String, message: String },
    /// The change could not be saved to the store's file on the head, so it was not made.
    #[error("cannot save the kv store to {path} on the head: {message}; the change was not made")]
    Persist { path: String, message: String },
    /// The store's file on the head cannot be read or is damaged: the store does not start
    /// rather than start empty and lose what the file holds.
    #[error(
        "the kv store file {path} on the head cannot be used: {message}. Nothing was changed; restore the \
         file, or move it away to start with an empty store"
    )]
    Unreadable { path: String, message: String },
    /// More watches are waiting on the store than it lets wait at once.
    #[error("{limit} kv watches are waiting already, the most the store lets wait at once")]
    TooManyWatches { limit: usize },
}

/// A key as an error shows it: escaped (a control character is visible), at most 80 characters.
fn shown_key(key: &str) -> String {
    const SHOWN: usize = 80;
    match key.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &key[..cut], key.len()),
        None => format!("{key:?}"),
    }
}

/// Where a refused `Bypass` was created, as the error says it.
fn bypass_place(
    node: &str,
    task: &Option<TaskId>,
    function: &Option<String>,
    job: &Option<SessionId>,
) -> String {
    match (task, function, job) {
        (Some(task), Some(function), Some(job)) => {
            format!("inside task {task} ({function}) of job {job} on node {node}")
        }
        (Some(task), _, _) => format!("inside {task}, a service's constructor or method call on node {node}"),
        _ => format!("on the connection of worker {node}"),
    }
}

/// `1073741824 bytes (1 GiB)`: the exact figure, and the largest binary unit it is a whole
/// number of, so two budgets that differ are visibly different.
fn describe_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    match UNITS.iter().find(|(_, shift)| bytes != 0 && bytes.is_multiple_of(1u64 << shift)) {
        Some((unit, shift)) => format!("{bytes} bytes ({} {unit})", bytes >> shift),
        None => format!("{bytes} bytes"),
    }
}

fn infeasible_note(infeasible: &Option<String>) -> String {
    match infeasible {
        Some(reason) => format!("; it is infeasible: {reason}"),
        None => String::new(),
    }
}
