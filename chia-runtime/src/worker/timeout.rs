//! Per-call timeouts (`#[chia::function(timeout_s = ..)]`, `Call::timeout`), enforced by the
//! worker that runs the attempt, counted from when it starts it. At the deadline the run is
//! timed out ([`TaskControl::time_out`]: cancelled with force, so `cx.is_cancelled()` turns
//! true and its processes are SIGKILLed as by `force_cancel`), and when it ends it is
//! reported as `TimedOut`, whatever the function returned.
//!
//! How soon it ends depends on what it is. An async function (and a bypass provider) that has
//! not returned [`RETURN_GRACE`] after its deadline is dropped, so the attempt ends and gives
//! its resources back even when the function ignores cancellation. A sync function runs on a
//! thread, which nothing can stop from outside: one that ignores cancellation keeps its
//! attempt, and its resources, until it returns — as a cancelled one does — and a warning
//! says so.

use crate::driver::process::TaskControl;
use chia_core::TaskId;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::AbortHandle;

/// How long a function stopped by its timeout has to return — to see `cx.cancelled()` and
/// tidy up — before an async one is dropped, or a sync one is warned about. The grace a
/// cancelled task's processes get between SIGTERM and SIGKILL, so a timeout is no hastier.
pub(crate) const RETURN_GRACE: Duration = crate::driver::process::CANCEL_GRACE;

/// Which run is timed, for the logs.
#[derive(Clone, Copy)]
pub(crate) struct Timed<'a> {
    pub(crate) task: TaskId,
    pub(crate) attempt: u32,
    pub(crate) function: &'a str,
}

/// Runs an async function's future under `limit` (none: as long as it takes). `None` when
/// it was still running [`RETURN_GRACE`] after its deadline and was dropped.
pub(crate) async fn run_async<T>(
    run: impl Future<Output = T>,
    control: &Arc<TaskControl>,
    limit: Option<Duration>,
    timed: Timed<'_>,
) -> Option<T> {
    let Some(limit) = limit else { return Some(run.await) };
    let mut run = std::pin::pin!(run);
    tokio::select! {
        // A run that ends as its deadline passes ended in time.
        biased;
        done = &mut run => return Some(done),
        () = tokio::time::sleep(limit) => {}
    }
    if control.time_out() {
        log_timed_out(timed, limit);
    }
    tokio::select! {
        biased;
        done = &mut run => Some(done),
        () = tokio::time::sleep(RETURN_GRACE) => {
            tracing::warn!(
                task = %timed.task,
                attempt = timed.attempt,
                function = timed.function,
                "had not returned {RETURN_GRACE:?} after its timeout: dropped, and reported as timed out"
            );
            None
        }
    }
}

/// Times a sync function's run, which goes on on its own thread: the returned handle stops
/// the timer when the run ends first.
pub(crate) fn watch_sync(control: Arc<TaskControl>, limit: Duration, timed: Timed<'static>) -> AbortHandle {
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        if !control.time_out() {
            return; // It ended as the deadline passed.
        }
        log_timed_out(timed, limit);
        tokio::time::sleep(RETURN_GRACE).await;
        // Still running (the timer is stopped when the run ends): say why it holds on.
        tracing::warn!(
            task = %timed.task,
            attempt = timed.attempt,
            function = timed.function,
            "has not returned {RETURN_GRACE:?} after its timeout; a sync function cannot be stopped from \
             outside its thread, so its attempt keeps its resources until it returns (check \
             cx.is_cancelled() in long loops)"
        );
    })
    .abort_handle()
}

fn log_timed_out(timed: Timed<'_>, limit: Duration) {
    tracing::warn!(
        task = %timed.task,
        attempt = timed.attempt,
        function = timed.function,
        "ran longer than its timeout of {limit:?}: cancelled with force, its processes killed"
    );
}
