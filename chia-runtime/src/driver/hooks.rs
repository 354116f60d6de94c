//! Setup and cleanup hooks around a remote function's attempts (the original CHIA's
//! `_chia_setup` / `_chia_cleanup`), declared on the function:
//!
//! ```
//! # extern crate chia_runtime as chia;
//! use chia::hooks::{Attempt, Ended};
//!
//! fn scratch(attempt: &Attempt) -> std::path::PathBuf {
//!     std::env::temp_dir().join(format!("scratch-{}-{}", attempt.task(), attempt.number()))
//! }
//!
//! /// Runs on the worker before every attempt of `simulate`.
//! fn prepare_tools(attempt: &Attempt) -> std::io::Result<()> {
//!     std::fs::create_dir_all(scratch(attempt))
//! }
//!
//! /// Runs on the worker after every attempt whose setup succeeded, however it ended.
//! async fn remove_scratch(attempt: &Attempt, ended: &Ended) -> std::io::Result<()> {
//!     if let Ended::Failed(error) = ended {
//!         eprintln!("{} attempt {} failed: {error}", attempt.function(), attempt.number());
//!     }
//!     tokio::fs::remove_dir_all(scratch(attempt)).await
//! }
//!
//! #[chia::function(setup = prepare_tools, cleanup = remove_scratch)]
//! fn simulate(cx: &chia::Context, design: String) -> String {
//!     // The task id names the attempt's scratch directory here too.
//!     let _task = cx.current_task();
//!     design
//! }
//! # fn main() {}
//! ```
//!
//! What a user can rely on:
//!
//! - **Order.** On the worker, for every attempt (a retry is a new attempt, with its own
//!   setup and cleanup): `setup` → the function → `cleanup`, one after the other, in the
//!   attempt's task context (what they start with [`Context::spawn`] is the task's, and is
//!   killed after the cleanup at the latest; nested calls belong to the task's job).
//! - **Cleanup runs if and only if setup succeeded** (Python's `try`/`finally` placed after
//!   the setup): after a value, an `Err`, a panic, a cancellation ([`ObjectRef::cancel`] and
//!   [`ObjectRef::force_cancel`] alike — force kills the task's child processes, not the
//!   worker; the function itself is not stopped, it sees [`Context::is_cancelled`] and
//!   returns, and then the cleanup runs), a timeout, and the worker losing its head (its
//!   running attempts are cancelled). A task cancelled or timed out while its setup runs does
//!   not start its function, but gets its cleanup. The cleanup learns how the attempt ended
//!   ([`Ended`]). The caller hears the attempt's outcome only after its cleanup has returned.
//!   After a cancellation or a timeout, [`Context::spawn`] refuses to start anything (the task
//!   is cancelled): a cleanup that must run a tool then starts it with a plain `Command` and
//!   waits for it; what it leaves running is ended with the attempt.
//! - **A failing setup** (an `Err`) skips the function and the cleanup and fails the attempt
//!   with [`TaskError::SetupFailed`], naming the hook and the function; with
//!   `retry_exceptions` it runs again like an `Err` of the function. A setup that panics
//!   fails it with [`TaskError::Panic`] (not retried, like a panicking function).
//! - **A failing cleanup** (an `Err` or a panic) is logged as a warning (with the task, the
//!   attempt, the function and the hook) and changes nothing: the attempt's value or error
//!   stands, as in the original.
//! - **Timeouts.** `timeout_s` (or `.timeout(..)`) covers the setup and the function
//!   together. The cleanup is not counted in it, but gets the same limit again: an `async`
//!   cleanup hook still running after it is dropped, with a warning (a sync hook runs on its
//!   thread and cannot be stopped from outside, like a sync function). Without a timeout, a
//!   cleanup takes as long as it takes, and holds its attempt meanwhile.
//! - **When hooks do not run**: a bypassed call (what replaces it never runs the function),
//!   and an attempt whose worker process dies (killed, crashed, lost power): hooks are for
//!   tidying up the worker, not for state that must survive a crash. An async function that
//!   ignores its timeout is dropped after the grace period and its cleanup still runs; a
//!   sync function that never returns never gets to its cleanup.
//!
//! Hooks may be sync or `async`, and return `()` or `Result<(), E>` with `E: Display`. A sync
//! hook of an `async` function runs on the async runtime's thread: keep it short, or make it
//! `async`. A hook whose path does not resolve, or whose signature is not one of these, is a
//! compile error pointing at the path in the attribute.
//!
//! [`Context::spawn`]: crate::Context::spawn
//! [`Context::is_cancelled`]: crate::Context::is_cancelled
//! [`ObjectRef::cancel`]: crate::ObjectRef::cancel
//! [`ObjectRef::force_cancel`]: crate::ObjectRef::force_cancel
//! [`TaskError::SetupFailed`]: crate::TaskError::SetupFailed
//! [`TaskError::Panic`]: crate::TaskError::Panic

use crate::driver::context::Context;
use chia_core::{TaskError, TaskId};

/// One attempt of a remote function, as its hooks see it.
#[derive(Clone)]
pub struct Attempt {
    function: &'static str,
    task: TaskId,
    number: u32,
    tag: Option<String>,
    context: Context,
}

impl Attempt {
    pub(crate) fn new(
        function: &'static str,
        task: TaskId,
        number: u32,
        tag: Option<String>,
        context: Context,
    ) -> Attempt {
        Attempt { function, task, number, tag, context }
    }

    /// The function's registered name (its `name = "..."`, or its identifier).
    pub fn function(&self) -> &str {
        self.function
    }

    /// The task this attempt runs: the same for every attempt of one call, and what the
    /// function's [`Context::current_task`] returns.
    pub fn task(&self) -> TaskId {
        self.task
    }

    /// Which attempt this is: 1 for the first run, 2 for the first retry, and so on.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The call's tag (`.tag(..)`), if it has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The attempt's task context: nested calls, [`Context::spawn`] (the child is the task's),
    /// [`Context::is_cancelled`].
    pub fn context(&self) -> &Context {
        &self.context
    }
}

/// How an attempt ended, as its cleanup hook learns it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ended {
    /// The function returned a value.
    Returned,
    /// The function returned `Err` or panicked: the error as the caller sees it
    /// ([`TaskError::Application`], [`TaskError::Panic`], ...).
    Failed(TaskError),
    /// The task was cancelled while it ran (whatever the function returned then): the caller
    /// gets [`TaskError::Cancelled`].
    Cancelled,
    /// The attempt ran longer than its timeout and was stopped (whatever the function
    /// returned): it fails with [`TaskError::TimedOut`] or runs again.
    TimedOut,
}

/// What `#[chia::function]` generates to wrap a hook (reached through `chia::__private`).
pub(crate) mod wrap {
    use std::future::Future;

    /// What a hook may return: `()` or `Result<(), E: Display>`.
    #[diagnostic::on_unimplemented(
        message = "a chia hook returns `()` or `Result<(), E>` with `E: Display` (an `async fn` hook too), not `{Self}`",
        label = "this hook returns `{Self}`"
    )]
    pub trait HookReturn {
        /// The hook's error, as text (with its whole `Display` chain).
        fn into_hook_result(self) -> Result<(), String>;
    }

    impl HookReturn for () {
        fn into_hook_result(self) -> Result<(), String> {
            Ok(())
        }
    }

    impl<E: std::fmt::Display> HookReturn for Result<(), E> {
        fn into_hook_result(self) -> Result<(), String> {
            self.map_err(|error| format!("{error:#}"))
        }
    }

    /// What a hook call returned, before the macro-generated code knows whether it is a future
    /// (an `async` hook) or a value (a sync one). Method resolution on `(&&&returned).hook_kind()`
    /// tells them apart on the concrete type the macro sees (autoref specialisation): it tries
    /// [`AsyncHook`] first, then [`SyncHook`], then [`NotAHook`], which always applies and whose
    /// `finish` reports the return type that is neither.
    pub struct Returned<T>(pub T);

    /// Picks [`AsFuture`] for what an `async` hook returned.
    pub trait AsyncHook {
        /// The way to finish this hook's run.
        fn hook_kind(&self) -> AsFuture {
            AsFuture
        }
    }

    impl<F> AsyncHook for &&Returned<F>
    where
        F: Future,
        F::Output: HookReturn,
    {
    }

    /// Picks [`AsValue`] for what a sync hook returned.
    pub trait SyncHook {
        /// The way to finish this hook's run.
        fn hook_kind(&self) -> AsValue {
            AsValue
        }
    }

    impl<R: HookReturn> SyncHook for &Returned<R> {}

    /// Picks [`AsValue`] for anything else, so the error is `HookReturn`'s, which says what a
    /// hook may return.
    pub trait NotAHook {
        /// The way to report this hook's return type.
        fn hook_kind(&self) -> AsValue {
            AsValue
        }
    }

    impl<T> NotAHook for Returned<T> {}

    /// Awaits an `async` hook's future.
    pub struct AsFuture;

    impl AsFuture {
        /// Awaits the hook's future and turns its output into the hook's result.
        pub async fn finish<F>(self, returned: Returned<F>) -> Result<(), String>
        where
            F: Future,
            F::Output: HookReturn,
        {
            returned.0.await.into_hook_result()
        }
    }

    /// Takes a sync hook's value.
    pub struct AsValue;

    impl AsValue {
        /// Turns the hook's value into its result.
        pub async fn finish<R: HookReturn>(self, returned: Returned<R>) -> Result<(), String> {
            returned.0.into_hook_result()
        }
    }
}
