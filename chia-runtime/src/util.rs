//! Two things every layer needs when it runs user code: catching a panic (a function, a
//! service method, a bypass provider or condition that panics fails only its call), and
//! running a future to completion from synchronous code.

use crate::error::Error;
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
            Err(Error::Setup(
                "a blocking chia call was made on a current-thread tokio runtime; use `.await` instead"
                    .into(),
            ))
        }
        Ok(_) => Ok(tokio::task::block_in_place(|| handle.block_on(future))),
        Err(_) => Ok(handle.block_on(future)),
    }
}
