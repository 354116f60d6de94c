//! Setup and cleanup hooks (`#[chia::function(setup = .., cleanup = ..)]`) on a real embedded
//! cluster: the order setup → function → cleanup on every attempt, retries included; cleanup
//! after an `Err`, a panic, a cancellation (during the function, and during the setup, which
//! skips the function), a force-cancellation that kills the task's
//! processes, and a timeout (a sync function's and an async one dropped after the grace); a
//! failing setup (no function, no cleanup, an error naming both, retried under
//! `retry_exceptions`); a failing cleanup that leaves the result alone.
//!
//! Every hook and body appends a line to a log file whose path travels as the call's tag,
//! so what the test reads holds for workers in other processes too. The caller hears an
//! attempt's outcome only after its cleanup returned, so reading the log after `get` needs
//! no waiting. Where the test must act while a task runs (a cancel), it waits for the body's
//! line through an in-process `Notify` (the embedded cluster's workers are in-process).

extern crate chia_runtime as chia;

mod common;

use chia::hooks::{Attempt, Ended};
use chia::{Context, Error, TaskError};
use common::{BOUND, cluster};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

// ------------------------------------------------------------------------------ the log

/// Appends one line to the log at `path`.
fn append(path: &Path, line: &str) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("log opens");
    writeln!(file, "{line}").expect("log line written");
}

fn read_log(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

/// The log a hook writes to: the call's tag.
fn log_of(attempt: &Attempt) -> PathBuf {
    PathBuf::from(attempt.tag().expect("every call in these tests is tagged with its log"))
}

/// How many attempts have started, as the setup lines count them (for a body, which has no
/// attempt number of its own).
fn setups(log: &Path) -> usize {
    read_log(log).iter().filter(|line| line.starts_with("setup ")).count()
}

fn ended_text(ended: &Ended) -> String {
    match ended {
        Ended::Returned => "returned".to_string(),
        Ended::Failed(TaskError::Application { message, .. }) => format!("failed: {message}"),
        Ended::Failed(TaskError::Panic { message, .. }) => format!("panicked: {message}"),
        Ended::Failed(other) => format!("failed otherwise: {other}"),
        Ended::Cancelled => "cancelled".to_string(),
        Ended::TimedOut => "timed out".to_string(),
        other => format!("{other:?}"),
    }
}

/// A fresh log in a temp dir that lives as long as the returned guard.
fn new_log() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("log.txt").to_str().expect("utf-8 temp path").to_string();
    (dir, path)
}

// ------------------------------------------------------------------------------ the hooks

/// Sync, returning `()`.
fn record_setup(attempt: &Attempt) {
    append(
        &log_of(attempt),
        &format!("setup {} {} {}", attempt.number(), attempt.function(), attempt.task()),
    );
}

/// Async, returning `Result`.
async fn record_cleanup(attempt: &Attempt, ended: &Ended) -> Result<(), std::io::Error> {
    tokio::task::yield_now().await;
    append(&log_of(attempt), &format!("cleanup {} {}", attempt.number(), ended_text(ended)));
    Ok(())
}

/// Async, returning `()`.
async fn record_setup_async(attempt: &Attempt) {
    tokio::task::yield_now().await;
    record_setup(attempt);
}

/// Sync, returning `Result`.
fn record_cleanup_sync(attempt: &Attempt, ended: &Ended) -> Result<(), String> {
    append(&log_of(attempt), &format!("cleanup {} {}", attempt.number(), ended_text(ended)));
    Ok(())
}

/// Waits in its setup until the task is cancelled, then succeeds.
async fn setup_waits_for_cancel(attempt: &Attempt) {
    record_setup(attempt);
    started(attempt.tag().expect("tagged")).notify_one();
    attempt.context().cancelled().await;
}

mod failing {
    use super::*;

    /// Fails on the first attempt only.
    pub fn first_setup(attempt: &Attempt) -> Result<(), String> {
        record_setup(attempt);
        if attempt.number() == 1 { Err("the tools are not there yet".to_string()) } else { Ok(()) }
    }

    pub fn setup_panics(attempt: &Attempt) {
        record_setup(attempt);
        panic!("no scratch space");
    }

    pub async fn cleanup(attempt: &Attempt, ended: &Ended) -> Result<(), String> {
        record_cleanup_sync(attempt, ended)?;
        Err("the scratch directory is busy".to_string())
    }

    pub fn cleanup_panics(attempt: &Attempt, ended: &Ended) {
        let _ = record_cleanup_sync(attempt, ended);
        panic!("cleanup tripped");
    }
}

// ------------------------------------------------------------------------------ the functions

/// Fails its first two attempts, succeeds on the third.
#[chia::function(setup = record_setup, cleanup = record_cleanup, retry_exceptions = true, max_retries = 2)]
async fn flaky(cx: &Context, log: String) -> Result<String, String> {
    let attempt = setups(Path::new(&log));
    let task = cx.current_task().expect("runs in a task");
    append(Path::new(&log), &format!("body {attempt} {task}"));
    if attempt < 3 { Err(format!("flake {attempt}")) } else { Ok(format!("made it on {attempt}")) }
}

/// A sync function with async hooks.
#[chia::function(setup = record_setup_async, cleanup = record_cleanup_sync)]
fn panics(log: String) -> u32 {
    append(Path::new(&log), "body");
    panic!("the simulator crashed");
}

/// Gates the test waits on before it acts on a running task, by log path.
static STARTED: LazyLock<Mutex<HashMap<String, Arc<Notify>>>> = LazyLock::new(Mutex::default);

fn started(log: &str) -> Arc<Notify> {
    STARTED.lock().unwrap().entry(log.to_string()).or_default().clone()
}

/// Waits for its cancellation, then returns as if it succeeded (its caller hears `Cancelled`).
#[chia::function(setup = record_setup, cleanup = record_cleanup)]
async fn waits_for_cancel(cx: &Context, log: String) -> String {
    append(Path::new(&log), "body");
    started(&log).notify_one();
    cx.cancelled().await;
    append(Path::new(&log), "body saw the cancellation");
    "done anyway".to_string()
}

/// A sync function that waits on a child process of its own: a force-cancel kills the child,
/// the wait returns, and the function returns.
#[chia::function(setup = record_setup, cleanup = record_cleanup_sync)]
fn waits_on_a_child(cx: &Context, log: String) -> Result<String, std::io::Error> {
    let mut child = cx.spawn_std(std::process::Command::new("sleep").arg("600"))?;
    append(Path::new(&log), &format!("body child {}", child.id()));
    started(&log).notify_one();
    let status = child.wait()?;
    append(
        Path::new(&log),
        &format!("body child ended by signal {:?}", std::os::unix::process::ExitStatusExt::signal(&status)),
    );
    Ok("the child ended".to_string())
}

#[chia::function(setup = setup_waits_for_cancel, cleanup = record_cleanup_sync)]
fn cancelled_in_setup(log: String) -> String {
    append(Path::new(&log), "body");
    "ran".to_string()
}

/// Loops until its timeout cancels it.
#[chia::function(setup = record_setup, cleanup = record_cleanup, timeout_s = 0.2)]
fn runs_past_its_timeout(cx: &Context, log: String) -> u32 {
    append(Path::new(&log), "body");
    while !cx.is_cancelled() {
        std::thread::sleep(Duration::from_millis(5));
    }
    7
}

/// Ignores its timeout: dropped after the grace, and its cleanup still runs.
#[chia::function(setup = record_setup, cleanup = record_cleanup_sync, timeout_s = 0.2)]
async fn ignores_its_timeout(log: String) -> u32 {
    append(Path::new(&log), "body");
    std::future::pending::<()>().await;
    7
}

#[chia::function(setup = failing::first_setup, cleanup = record_cleanup, retry_exceptions = true, max_retries = 1)]
fn setup_fails_once(log: String) -> String {
    append(Path::new(&log), &format!("body {}", setups(Path::new(&log))));
    "ran".to_string()
}

#[chia::function(setup = failing::first_setup, cleanup = record_cleanup)]
async fn setup_fails_for_good(log: String) -> String {
    append(Path::new(&log), "body");
    "ran".to_string()
}

#[chia::function(setup = failing::setup_panics, cleanup = record_cleanup, retry_exceptions = true)]
fn setup_panics(log: String) -> String {
    append(Path::new(&log), "body");
    "ran".to_string()
}

#[chia::function(setup = record_setup, cleanup = failing::cleanup)]
fn cleanup_fails(log: String) -> String {
    append(Path::new(&log), "body");
    "the result".to_string()
}

#[chia::function(cleanup = failing::cleanup_panics, name = "cleanup_panics_renamed")]
async fn cleanup_panics(log: String) -> String {
    append(Path::new(&log), "body");
    "the result".to_string()
}

// ------------------------------------------------------------------------------ the tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_runs_setup_then_the_function_then_cleanup() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    let value = flaky::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await.unwrap();
    assert_eq!(value, "made it on 3");
    let lines = read_log(Path::new(&log));
    let task = lines[0].rsplit(' ').next().unwrap().to_string();
    assert_eq!(
        lines,
        [
            format!("setup 1 flaky {task}"),
            format!("body 1 {task}"),
            "cleanup 1 failed: flake 1".to_string(),
            format!("setup 2 flaky {task}"),
            format!("body 2 {task}"),
            "cleanup 2 failed: flake 2".to_string(),
            format!("setup 3 flaky {task}"),
            format!("body 3 {task}"),
            "cleanup 3 returned".to_string(),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_after_a_panic_and_the_caller_gets_the_panic() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    match panics::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await {
        Err(Error::Task(TaskError::Panic { function, message })) => {
            assert_eq!(function, "panics");
            assert_eq!(message, "the simulator crashed");
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    let lines = read_log(Path::new(&log));
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("setup 1 panics "), "{lines:?}");
    assert_eq!(lines[1..], ["body", "cleanup 1 panicked: the simulator crashed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_after_a_cancel_before_the_caller_hears_cancelled() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    // `notify_one` leaves a permit when the body gets there first.
    let gate = started(&log);
    let running = waits_for_cancel::call(log.clone()).tag(&log).remote(&cx);
    tokio::time::timeout(BOUND, gate.notified()).await.expect("the body starts");
    running.cancel().unwrap();
    match running.get_timeout(BOUND).await {
        Err(Error::Task(TaskError::Cancelled { function })) => assert_eq!(function, "waits_for_cancel"),
        other => panic!("expected Cancelled, got {other:?}"),
    }
    let lines = read_log(Path::new(&log));
    assert_eq!(lines[1..], ["body", "body saw the cancellation", "cleanup 1 cancelled"], "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_cancelled_during_its_setup_skips_the_function_but_not_the_cleanup() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    let gate = started(&log);
    let running = cancelled_in_setup::call(log.clone()).tag(&log).remote(&cx);
    tokio::time::timeout(BOUND, gate.notified()).await.expect("the setup starts");
    running.cancel().unwrap();
    assert!(matches!(running.get_timeout(BOUND).await, Err(Error::Task(TaskError::Cancelled { .. }))));
    let lines = read_log(Path::new(&log));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("setup 1 cancelled_in_setup "), "{lines:?}");
    assert_eq!(lines[1], "cleanup 1 cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_after_a_force_cancel_that_kills_the_tasks_processes() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    // `notify_one` leaves a permit when the body gets there first.
    let gate = started(&log);
    let running = waits_on_a_child::call(log.clone()).tag(&log).remote(&cx);
    tokio::time::timeout(BOUND, gate.notified()).await.expect("the body starts its child");
    running.force_cancel().unwrap();
    assert!(matches!(running.get_timeout(BOUND).await, Err(Error::Task(TaskError::Cancelled { .. }))));
    let lines = read_log(Path::new(&log));
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[1].starts_with("body child "), "{lines:?}");
    assert_eq!(lines[2..], ["body child ended by signal Some(9)", "cleanup 1 cancelled"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_after_a_timeout_and_learns_it() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    let result = runs_past_its_timeout::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await;
    assert!(matches!(result, Err(Error::Task(TaskError::TimedOut { attempt: 1, .. }))), "{result:?}");
    assert_eq!(read_log(Path::new(&log))[1..], ["body", "cleanup 1 timed out"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_after_an_async_function_is_dropped_past_its_timeout() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    let result = ignores_its_timeout::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await;
    assert!(matches!(result, Err(Error::Task(TaskError::TimedOut { .. }))), "{result:?}");
    assert_eq!(read_log(Path::new(&log))[1..], ["body", "cleanup 1 timed out"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_setup_skips_the_function_and_cleanup_and_names_the_hook() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;

    // Without retry_exceptions the first failure is final.
    let (_dir, log) = new_log();
    match setup_fails_for_good::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await {
        Err(Error::Task(error @ TaskError::SetupFailed { .. })) => {
            assert_eq!(
                error,
                TaskError::SetupFailed {
                    function: "setup_fails_for_good".into(),
                    hook: "failing::first_setup".into(),
                    attempt: 1,
                    message: "the tools are not there yet".into(),
                }
            );
            assert_eq!(
                error.to_string(),
                "setup_fails_for_good did not run: its setup hook failing::first_setup failed on attempt 1: \
                 the tools are not there yet"
            );
        }
        other => panic!("expected SetupFailed, got {other:?}"),
    }
    let lines = read_log(Path::new(&log));
    assert_eq!(lines.len(), 1, "neither the function nor the cleanup ran: {lines:?}");

    // With retry_exceptions it runs again, like an `Err` of the function.
    let (_dir, log) = new_log();
    let value = setup_fails_once::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await.unwrap();
    assert_eq!(value, "ran");
    let lines = read_log(Path::new(&log));
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0].starts_with("setup 1 ") && lines[1].starts_with("setup 2 "), "{lines:?}");
    assert_eq!(lines[2..], ["body 2", "cleanup 2 returned"]);

    // A panicking setup is a panic (not retried, even with retry_exceptions), naming the hook.
    let (_dir, log) = new_log();
    match setup_panics::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await {
        Err(Error::Task(TaskError::Panic { function, message })) => {
            assert_eq!(function, "setup_panics");
            assert_eq!(message, "in its setup hook failing::setup_panics: no scratch space");
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_eq!(read_log(Path::new(&log)).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cleanup_leaves_the_result_alone() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let (_dir, log) = new_log();
    let value = cleanup_fails::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await.unwrap();
    assert_eq!(value, "the result");
    assert_eq!(read_log(Path::new(&log))[1..], ["body", "cleanup 1 returned"]);

    let (_dir, log) = new_log();
    let value = cleanup_panics::call(log.clone()).tag(&log).remote(&cx).get_timeout(BOUND).await.unwrap();
    assert_eq!(value, "the result");
    assert_eq!(read_log(Path::new(&log)), ["body", "cleanup 1 returned"]);
}

#[test]
fn the_spec_names_its_hooks() {
    assert_eq!(flaky::SPEC.setup.map(|hook| hook.name), Some("record_setup"));
    assert_eq!(flaky::SPEC.cleanup.map(|hook| hook.name), Some("record_cleanup"));
    assert_eq!(cleanup_panics::SPEC.setup.map(|hook| hook.name), None);
    assert_eq!(cleanup_panics::SPEC.cleanup.map(|hook| hook.name), Some("failing::cleanup_panics"));
}
