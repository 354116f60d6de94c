//! What every layer needs: catching a panic (a function, a service method, a bypass provider
//! or condition that panics fails only its call), running a future to completion from
//! synchronous code, and how to wait between tries to reach the head.

use crate::error::Error;
use chia_core::{ResourceAmount, Resources};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::Poll;

/// Resolves to the future's output, or to the panic it raised while being polled.
pub(crate) struct CatchUnwind<F>(pub(crate) F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => text.to_string(),
            Err(_) => "(a panic with a non-text payload)".to_string(),
        },
    }
}

/// Runs `future` to completion from synchronous code: on a blocking-pool thread, a thread
/// outside any runtime, or a multi-threaded runtime's worker (via `block_in_place`).
pub(crate) fn block_on<F: Future>(handle: &tokio::runtime::Handle, future: F) -> Result<F::Output, Error> {
    match tokio::runtime::Handle::try_current() {
        Ok(current) if current.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            Err(Error::BlockingOnCurrentThread)
        }
        Ok(_) => Ok(tokio::task::block_in_place(|| handle.block_on(future))),
        Err(_) => Ok(handle.block_on(future)),
    }
}

/// How a peer that lost its head (or cannot reach it yet) tries again: the first retry after
/// `first`, doubling up to `max`, each with up to 25 % random jitter so that the workers of a
/// cluster do not all knock at once.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: std::time::Duration,
    pub max: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { first: std::time::Duration::from_millis(100), max: std::time::Duration::from_secs(5) }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> std::time::Duration {
        let base = self.first.saturating_mul(1 << attempt.min(16)).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }
}

/// Runs a sync provider (called by `#[chia::provider]` code) without stalling the runtime's
/// other tasks: on a multi-threaded runtime the thread hands its other work off first.
pub fn run_sync<T>(provider: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(provider)
        }
        _ => provider(),
    }
}

/// A builder's `resource(name, amount)`: sets `name` to `amount` in `request`, or keeps the
/// first reason it cannot in `invalid` (prefixed with `what`), for the builder to report when
/// it is used — so chained setters need no `Result` each.
pub(crate) fn ask_resource(
    request: &mut Resources,
    invalid: &mut Option<String>,
    what: &str,
    name: &str,
    amount: f64,
) {
    let result = ResourceAmount::from_f64(amount).and_then(|amount| request.set(name, amount));
    if let Err(e) = result {
        invalid.get_or_insert_with(|| format!("{what} {name}: {e}"));
    }
}
