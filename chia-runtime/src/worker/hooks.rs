//! Running a function's setup and cleanup hooks around one attempt (what a user can rely on
//! is in [`crate::hooks`]). The worker's run paths decide *when*; this module runs a hook and
//! turns what it did into the attempt's error (setup) or a log line (cleanup).

use super::Lease;
use crate::driver::context::Context;
use crate::driver::hooks::{Attempt, Ended};
use crate::driver::process::RunEnd;
use crate::driver::registry::FunctionSpec;
use crate::util::{CatchUnwind, panic_message};
use chia_core::TaskError;
use chia_core::protocol::Outcome;
use std::time::Duration;

/// The hooks of one attempt of a function that declares any.
pub(super) struct Hooks {
    spec: &'static FunctionSpec,
    attempt: Attempt,
}

impl Hooks {
    /// `None` when the function has no hooks (nothing to do, nothing to allocate).
    pub(super) fn of(
        spec: &'static FunctionSpec,
        lease: Lease,
        tag: Option<String>,
        context: &Context,
    ) -> Option<Hooks> {
        if spec.setup.is_none() && spec.cleanup.is_none() {
            return None;
        }
        let attempt = Attempt::new(spec.name, lease.task, lease.attempt, tag, context.clone());
        Some(Hooks { spec, attempt })
    }

    /// Runs the setup hook, if there is one. An `Err` becomes `SetupFailed`, a panic `Panic`,
    /// both naming the hook and the function; either way neither the function nor the
    /// cleanup runs.
    pub(super) async fn setup(&self) -> Result<(), TaskError> {
        let Some(hook) = self.spec.setup else { return Ok(()) };
        let function = self.spec.name.to_string();
        match CatchUnwind((hook.run)(self.attempt.clone())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => {
                tracing::debug!(hook = hook.name, %message, "the setup hook failed");
                Err(TaskError::SetupFailed {
                    function,
                    hook: hook.name.to_string(),
                    attempt: self.attempt.number(),
                    message,
                })
            }
            Err(panic) => Err(TaskError::Panic {
                function,
                message: format!("in its setup hook {}: {}", hook.name, panic_message(panic)),
            }),
        }
    }

    /// After a setup that succeeded: a task cancelled (or timed out) while its setup ran does
    /// not start its function (its caller hears `Cancelled` or `TimedOut` either way), but
    /// still gets its cleanup.
    pub(super) fn stopped_during_setup(&self) -> Option<Outcome> {
        self.spec.setup?;
        self.attempt
            .context()
            .is_cancelled()
            .then(|| Outcome::Failed(TaskError::Cancelled { function: self.spec.name.to_string() }))
    }

    /// Runs the cleanup hook, if there is one, after an attempt whose setup succeeded. What
    /// it does is logged and changes nothing; past `limit` (the attempt's timeout, counted
    /// again from here) it is dropped.
    pub(super) async fn cleanup(&self, ended: Ended, limit: Option<Duration>) {
        let Some(hook) = self.spec.cleanup else { return };
        let attempt = &self.attempt;
        let run = CatchUnwind((hook.run)(attempt.clone(), ended));
        let finished = match limit {
            Some(limit) => tokio::time::timeout(limit, run).await.map_err(|_| limit),
            None => Ok(run.await),
        };
        let failure = match finished {
            Ok(Ok(Ok(()))) => return,
            Ok(Ok(Err(message))) => message,
            Ok(Err(panic)) => format!("panicked: {}", panic_message(panic)),
            Err(limit) => {
                format!("had not returned {limit:?} (the attempt's timeout) after it started: dropped")
            }
        };
        tracing::warn!(
            task = %attempt.task(),
            attempt = attempt.number(),
            function = attempt.function(),
            hook = hook.name,
            error = %failure,
            "the cleanup hook failed; the attempt's outcome stands"
        );
    }
}

/// How the attempt ended, for its cleanup: a timeout wins over a cancellation (it cancels the
/// run itself), a cancellation over what the function returned (the caller hears `Cancelled`).
pub(super) fn ended(end: RunEnd, cancelled: bool, outcome: &Outcome) -> Ended {
    match (end, outcome) {
        (RunEnd::TimedOut, _) => Ended::TimedOut,
        _ if cancelled => Ended::Cancelled,
        (RunEnd::InTime, Outcome::Value(_)) => Ended::Returned,
        (RunEnd::InTime, Outcome::Failed(error)) => Ended::Failed(error.clone()),
    }
}
