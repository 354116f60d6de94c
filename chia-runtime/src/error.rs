//! The error a user sees from `get`, `wait` and `init`.

use chia_core::{TaskError, TaskId};
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
}

fn infeasible_note(infeasible: &Option<String>) -> String {
    match infeasible {
        Some(reason) => format!("; it is infeasible: {reason}"),
        None => String::new(),
    }
}
