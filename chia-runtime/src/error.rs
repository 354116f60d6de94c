//! The error a user sees from `get`, `wait` and `init`.

use chia_core::{SessionId, TaskError, TaskId};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
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
