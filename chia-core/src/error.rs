//! How a task can fail, in a form that travels from a worker through the head to a driver.

use crate::ids::TaskId;
use serde::{Deserialize, Serialize};

/// Why a task produced no value. Every variant names the function, so a driver can print it
/// as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The function returned `Err`; `message` is the error's `Display` text.
    #[error("{function} returned an error: {message}")]
    Application {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The error's `Display` text, its sources included.
        message: String,
    },
    /// The function panicked; the worker caught it and kept serving.
    #[error("{function} panicked: {message}")]
    Panic {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The panic's message.
        message: String,
    },
    /// An argument could not be decoded as the type the function takes.
    #[error("{function}: argument {index} could not be decoded: {message}")]
    BadArgument {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The argument's position, from 0.
        index: usize,
        /// The decoder's error.
        message: String,
    },
    /// The call had a different number of arguments than the function takes.
    #[error("{function} takes {expected} argument(s), the call passed {found}")]
    ArgumentCount {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// How many arguments the function takes.
        expected: usize,
        /// How many the call passed.
        found: usize,
    },
    /// No node in the cluster registered a function with this name.
    #[error("no node in the cluster has the function {function}; link it into the worker binary")]
    UnknownFunction {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
    },
    /// Nodes registered the name, but with another signature (different binaries).
    #[error(
        "function {function} has signature {expected} in the caller but {found:?} on the cluster's nodes; rebuild the worker with the same code"
    )]
    SignatureMismatch {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The signature hash the caller was built with.
        expected: String,
        /// The signature hashes the cluster's nodes offer.
        found: Vec<String>,
    },
    /// An `ObjectRef` argument failed, so this task never ran.
    #[error("{function} did not run because its argument {dependency} failed: {cause}")]
    DependencyFailed {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The argument's task.
        dependency: TaskId,
        /// Why the argument failed.
        cause: Box<TaskError>,
    },
    /// An `ObjectRef` argument names an object the head does not hold (released or never submitted).
    #[error("{function} did not run because its argument {dependency} is not known to the head")]
    UnknownDependency {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The argument's task.
        dependency: TaskId,
    },
    /// The node running the task disconnected (or went silent) before it finished, and no
    /// retries were left. `attempts` counts the runs that really started (a dispatch the
    /// worker never acknowledged is not one), this one included; `lost_on` names the workers
    /// those runs were lost with, oldest first.
    #[error(
        "{function}: the worker {node} running it died or disconnected before the task finished; {attempts} attempt(s) ran{}, no retries left (see max_retries)",
        lost_on_text(lost_on)
    )]
    WorkerLost {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The worker the last attempt ran on.
        node: String,
        /// How many runs really started, the last one included.
        #[serde(default)]
        attempts: u32,
        /// The workers those runs were lost with, oldest first.
        #[serde(default)]
        lost_on: Vec<String>,
    },
    /// The task was cancelled before it finished (or before it started).
    #[error("{function} was cancelled")]
    Cancelled {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
    },
    /// Attempt `attempt` (1 for the first) ran longer than the call's timeout (`timeout_ms`,
    /// from `#[chia::function(timeout_s = ..)]` or `.timeout(..)`) and was stopped: cancelled
    /// with force, its processes killed. Retried like an `Err` when the call says
    /// `retry_exceptions`; this is the last attempt's.
    #[error(
        "{function} ran longer than its timeout of {} on attempt {attempt} and was stopped (see timeout_s / .timeout)",
        seconds_text(*timeout_ms)
    )]
    TimedOut {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The timeout, in milliseconds.
        timeout_ms: u64,
        /// The attempt, 1 for the first.
        attempt: u32,
    },
    /// The function's setup hook (`#[chia::function(setup = hook)]`) failed on attempt
    /// `attempt` (1 for the first), so neither the function nor its cleanup ran. Retried
    /// like an `Err` of the function when the call says `retry_exceptions`. (A setup that
    /// panics fails the attempt with `Panic`, as a panicking function does.)
    #[error("{function} did not run: its setup hook {hook} failed on attempt {attempt}: {message}")]
    SetupFailed {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The hook's path as the attribute names it.
        hook: String,
        /// The attempt, 1 for the first.
        attempt: u32,
        /// What went wrong, as text.
        message: String,
    },
    /// The call was rejected before it was sent (an argument failed to encode, a bad option).
    #[error("{function}: invalid call: {message}")]
    InvalidCall {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// What went wrong, as text.
        message: String,
    },
    /// The service a call was addressed to is not running (stopped, never started, or its node
    /// was lost).
    #[error("service {service} is not available: {message}")]
    ServiceUnavailable {
        /// The service's name.
        service: String,
        /// What went wrong, as text.
        message: String,
    },
    /// The result could not be encoded on the worker.
    #[error("{function}: its result could not be encoded: {message}")]
    BadResult {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The encoder's error.
        message: String,
    },
    /// The call's placement group could not take it, or (answering a group's `ready`) the
    /// group cannot be placed or is gone.
    #[error("placement group {group} {problem}")]
    PlacementGroup {
        /// The group's id.
        group: String,
        /// What is wrong.
        problem: crate::placement::GroupProblem,
    },
    /// The call was bypassed and what replaced it failed: the provider returned an error, is
    /// not linked into the worker, or the recorded `data:` file could not be read.
    #[error("{function} (bypassed by {provider}): {message}")]
    BypassFailed {
        /// The function's registered name (`Type.method` for a service's method).
        function: String,
        /// The provider's registered name (or the default provider's).
        provider: String,
        /// What went wrong, as text.
        message: String,
    },
}

/// `2500` → "2.5 s", `3_600_000` → "3600 s": the timeout as it was written, in seconds.
fn seconds_text(ms: u64) -> String {
    let (whole, millis) = (ms / 1000, ms % 1000);
    if millis == 0 {
        return format!("{whole} s");
    }
    let fraction = format!("{millis:03}");
    format!("{whole}.{} s", fraction.trim_end_matches('0'))
}

/// ", lost with w1, w2 and w3" for the workers a task's runs were lost with.
fn lost_on_text(workers: &[String]) -> String {
    match workers {
        [] => String::new(),
        [only] => format!(", lost with {only}"),
        [rest @ .., last] => format!(", lost with {} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_is_shown_in_seconds_as_written() {
        let timed_out = |timeout_ms| TaskError::TimedOut { function: "f".into(), timeout_ms, attempt: 2 };
        assert_eq!(
            timed_out(2500).to_string(),
            "f ran longer than its timeout of 2.5 s on attempt 2 and was stopped (see timeout_s / .timeout)"
        );
        assert!(timed_out(3_600_000).to_string().contains("of 3600 s "));
        assert!(timed_out(1).to_string().contains("of 0.001 s "));
        assert!(timed_out(1050).to_string().contains("of 1.05 s "));
    }
}
