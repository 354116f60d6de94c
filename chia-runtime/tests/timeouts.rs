//! Per-function and per-call timeouts over a real embedded cluster: a run that takes longer
//! than its timeout is stopped by its worker and fails with `TimedOut`, whatever it returns;
//! `.timeout(..)` and `.no_timeout()` override `timeout_s`; with `retry_exceptions` a timed-out
//! run runs again. Tests synchronise on what the tasks report (gates, counters), never on
//! sleeps; durations only bound a test that would otherwise hang. (That a timed-out task's
//! process tree is gone is checked on real worker processes, in
//! `examples/tests/process_trees.rs`.)

extern crate chia_runtime as chia;

mod common;

use chia::{Context, Error, TaskError};
use common::{BOUND, cluster};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Sleeps for `millis` unless cancelled first, in steps, as a careful long loop does; returns
/// what happened either way (a timed-out run's value is not what its caller gets).
#[chia::function(timeout_s = 0.25)]
fn sleeps(cx: &Context, millis: u64) -> String {
    let until = Instant::now() + Duration::from_millis(millis);
    while Instant::now() < until {
        if cx.is_cancelled() {
            return "saw the cancellation".to_string();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    "slept in full".to_string()
}

/// The same without a `timeout_s` of its own: only a call's `.timeout(..)` limits it.
#[chia::function]
async fn sleeps_without_timeout(cx: &Context, millis: u64) -> String {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(millis)) => "slept in full".to_string(),
        () = cx.cancelled() => "saw the cancellation".to_string(),
    }
}

/// Far under its timeout.
#[chia::function(timeout_s = 60)]
fn quick(x: i64) -> i64 {
    x + 1
}

/// How many runs each key's task has started.
static RUNS: LazyLock<Mutex<HashMap<String, u32>>> = LazyLock::new(Mutex::default);

fn runs(key: &str) -> u32 {
    RUNS.lock().unwrap().get(key).copied().unwrap_or(0)
}

/// Counts its run, then waits until its timeout cancels it and returns as if it succeeded.
#[chia::function(timeout_s = 0.2, retry_exceptions = true, max_retries = 1)]
async fn outlasts_every_run(cx: &Context, key: String) -> u32 {
    let run = {
        let mut runs = RUNS.lock().unwrap();
        let run = runs.entry(key).or_default();
        *run += 1;
        *run
    };
    cx.cancelled().await;
    run
}

/// Set when [`ignores_cancellation`]'s future is dropped.
static DROPPED: LazyLock<Mutex<HashMap<String, bool>>> = LazyLock::new(Mutex::default);

struct SaysWhenDropped(String);

impl Drop for SaysWhenDropped {
    fn drop(&mut self) {
        DROPPED.lock().unwrap().insert(self.0.clone(), true);
    }
}

/// Never returns, and does not look at its cancellation.
#[chia::function(timeout_s = 0.2)]
async fn ignores_cancellation(key: String) -> u32 {
    let _guard = SaysWhenDropped(key);
    std::future::pending::<()>().await;
    7
}

/// What a sync task that holds on after its timeout tells the test, and waits for from it.
#[derive(Default)]
struct Holdout {
    saw_cancellation: Notify,
    released: Mutex<bool>,
    release: Condvar,
    returned: AtomicBool,
}

static HOLDOUTS: LazyLock<Mutex<HashMap<String, Arc<Holdout>>>> = LazyLock::new(Mutex::default);

fn holdout(key: &str) -> Arc<Holdout> {
    HOLDOUTS.lock().unwrap().entry(key.to_string()).or_default().clone()
}

/// A sync function that notices its cancellation but carries on until the test lets it go,
/// then returns a value.
#[chia::function(timeout_s = 0.2)]
fn holds_on_after_its_timeout(cx: &Context, key: String) -> u32 {
    let holdout = holdout(&key);
    while !cx.is_cancelled() {
        std::thread::sleep(Duration::from_millis(5));
    }
    holdout.saw_cancellation.notify_one();
    let mut released = holdout.released.lock().unwrap();
    while !*released {
        released = holdout.release.wait(released).unwrap();
    }
    holdout.returned.store(true, Ordering::SeqCst);
    42
}

/// The `TimedOut` error of `result`, or a failure naming what came instead.
fn timed_out<T: std::fmt::Debug>(result: Result<T, Error>) -> (String, u64, u32) {
    match result {
        Err(Error::Task(TaskError::TimedOut { function, timeout_ms, attempt })) => {
            (function, timeout_ms, attempt)
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_its_timeout_s_fails_with_timed_out_whatever_it_returns() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let result = sleeps::remote(&cx, 60_000).get_timeout(BOUND).await;
    assert_eq!(timed_out(result), ("sleeps".to_string(), 250, 1));
    let error = sleeps::remote(&cx, 60_000).get_timeout(BOUND).await.unwrap_err();
    assert!(error.to_string().contains("sleeps ran longer than its timeout of 0.25 s"), "{error}");
    // Under its timeout (by far, so a loaded machine cannot make it late) it succeeds.
    assert_eq!(quick::remote(&cx, 1).get_timeout(BOUND).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_timeout_overrides_the_functions() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    // Shorter than the function's, and on a function without one.
    let shorter = sleeps::call(60_000).timeout(Duration::from_millis(100)).remote(&cx);
    assert_eq!(timed_out(shorter.get_timeout(BOUND).await), ("sleeps".to_string(), 100, 1));
    let limited = sleeps_without_timeout::call(60_000).timeout(Duration::from_millis(150)).remote(&cx);
    assert_eq!(timed_out(limited.get_timeout(BOUND).await), ("sleeps_without_timeout".to_string(), 150, 1));
    // Longer than the function's 0.25 s, or none at all: a 0.6 s run succeeds.
    let longer = sleeps::call(600).timeout(Duration::from_secs(60)).remote(&cx);
    assert_eq!(longer.get_timeout(BOUND).await.unwrap(), "slept in full");
    let unlimited = sleeps::call(600).no_timeout().remote(&cx);
    assert_eq!(unlimited.get_timeout(BOUND).await.unwrap(), "slept in full");
    // A zero timeout is a mistake, not "no timeout".
    match sleeps::call(0).timeout(Duration::ZERO).remote(&cx).get_timeout(BOUND).await {
        Err(Error::Task(TaskError::InvalidCall { function, message })) => {
            assert_eq!(function, "sleeps");
            assert!(message.contains("no_timeout"), "{message}");
        }
        other => panic!("expected an invalid call, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_run_is_retried_with_retry_exceptions_then_fails_timed_out() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let key = "retried".to_string();
    let result = outlasts_every_run::remote(&cx, key.clone()).get_timeout(BOUND).await;
    // max_retries = 1: two runs, and the error is the second's.
    assert_eq!(timed_out(result), ("outlasts_every_run".to_string(), 200, 2));
    assert_eq!(runs(&key), 2);
    // Without retry_exceptions for this call, the first timeout is final.
    let key = "not retried".to_string();
    let once = outlasts_every_run::call(key.clone()).retry_exceptions(false).remote(&cx);
    assert_eq!(timed_out(once.get_timeout(BOUND).await).2, 1);
    assert_eq!(runs(&key), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_function_that_ignores_its_timeout_is_dropped_after_the_grace() {
    let (_cluster, cx) = cluster(&["CPU=1"]).await;
    let key = "ignored".to_string();
    let result = ignores_cancellation::remote(&cx, key.clone()).get_timeout(BOUND).await;
    assert_eq!(timed_out(result), ("ignores_cancellation".to_string(), 200, 1));
    assert_eq!(DROPPED.lock().unwrap().get(&key), Some(&true), "its future was dropped before the answer");
    // The attempt ended, so its one CPU is free again for the next task.
    assert_eq!(quick::remote(&cx, 41).get_timeout(BOUND).await.unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_function_that_carries_on_after_its_timeout_ends_timed_out_when_it_returns() {
    let (_cluster, cx) = cluster(&["CPU=1"]).await;
    let key = "holdout";
    let holdout = holdout(key);
    let saw = holdout.saw_cancellation.notified();
    let running = holds_on_after_its_timeout::remote(&cx, key.to_string());
    tokio::time::timeout(BOUND, saw).await.expect("the timeout cancels the run");
    *holdout.released.lock().unwrap() = true;
    holdout.release.notify_all();
    let result = running.get_timeout(BOUND).await;
    assert!(holdout.returned.load(Ordering::SeqCst), "answered only once the function returned");
    assert_eq!(timed_out(result), ("holds_on_after_its_timeout".to_string(), 200, 1));
}
