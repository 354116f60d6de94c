//! End-to-end tests over real loopback QUIC: a real head and real workers in this process
//! (the same code a multi-process cluster runs), driven through the public API.
//! Tests synchronise on events (gates the test opens, notifications from running tasks),
//! never on sleeps; timeouts only bound a test that would otherwise hang.

extern crate chia_runtime as chia;

mod common;

use common::{BOUND, cluster, resources};

use chia::{Context, Error, TaskError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// A named gate shared by a test and the tasks it starts: tasks count themselves in, then
/// wait for a permit the test hands out.
struct Gate {
    running: AtomicUsize,
    started: AtomicUsize,
    max_running: AtomicUsize,
    permits: Semaphore,
    changed: Notify,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            running: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            permits: Semaphore::new(0),
            changed: Notify::new(),
        }
    }
}

static GATES: LazyLock<Mutex<HashMap<String, Arc<Gate>>>> = LazyLock::new(Default::default);

fn gate(name: &str) -> Arc<Gate> {
    GATES.lock().unwrap().entry(name.to_string()).or_default().clone()
}

impl Gate {
    /// Waits until `condition` holds, woken by every change the tasks make.
    async fn until(&self, condition: impl Fn(&Gate) -> bool) {
        tokio::time::timeout(BOUND, async {
            loop {
                let changed = self.changed.notified();
                if condition(self) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .expect("condition reached within the bound");
    }
}

#[chia::function(resources(adder = 1))]
fn add(cx: &Context, x: i64, y: i64) -> (i64, String) {
    (x + y, cx.node_name().to_string())
}

#[chia::function(resources(multiplier = 1))]
fn multiply(cx: &Context, x: i64, y: i64) -> (i64, String) {
    (x * y, cx.node_name().to_string())
}

#[chia::function(resources(adder = 1))]
fn increment(x: i64) -> i64 {
    x + 1
}

/// Holds an `adder` until the test lets it go.
#[chia::function(resources(adder = 1), num_cpus = 0)]
async fn gated(name: String) -> usize {
    let gate = gate(&name);
    let now = gate.running.fetch_add(1, Ordering::SeqCst) + 1;
    gate.max_running.fetch_max(now, Ordering::SeqCst);
    gate.started.fetch_add(1, Ordering::SeqCst);
    gate.changed.notify_waiters();
    gate.permits.acquire().await.expect("gate open").forget();
    gate.running.fetch_sub(1, Ordering::SeqCst);
    gate.changed.notify_waiters();
    now
}

#[chia::function]
fn fails(reason: String) -> Result<i64, std::io::Error> {
    Err(std::io::Error::other(reason))
}

/// Fails until it has been attempted `failures` times under `key`, then succeeds.
#[chia::function(retry_exceptions = true)]
fn flaky(key: String, failures: usize) -> Result<usize, String> {
    static ATTEMPTS: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(Mutex::default);
    let mut attempts = ATTEMPTS.lock().unwrap();
    let attempt = attempts.entry(key).or_default();
    *attempt += 1;
    if *attempt <= failures { Err(format!("attempt {attempt} fails")) } else { Ok(*attempt) }
}

#[chia::function]
fn panics(message: String) -> i64 {
    panic!("{message}")
}

#[chia::function(name = "tests.bytes")]
fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[chia::function]
fn checksum(data: Vec<u8>) -> u64 {
    data.iter().map(|b| *b as u64).sum()
}

/// Needs a whole CPU and dispatches children that need one too: on a one-CPU node this only
/// finishes because a blocked parent gives its CPU back.
#[chia::function(num_cpus = 1)]
async fn parent(cx: &Context, n: i64) -> Result<i64, Error> {
    let children: Vec<_> = (0..n).map(|i| child::remote(cx, i)).collect();
    let mut total = 0;
    for child in &children {
        total += child.get().await?;
    }
    Ok(total)
}

#[chia::function(num_cpus = 1)]
fn child(i: i64) -> i64 {
    i * 10
}

/// A sync function making a nested call with the blocking API.
#[chia::function(num_cpus = 0)]
fn sync_parent(cx: &Context, x: i64) -> Result<i64, Error> {
    Ok(increment::remote_blocking(cx, x)? * 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_go_to_nodes_with_the_resources_they_need() {
    let (_cluster, cx) = cluster(&["adder=1,CPU=4", "multiplier=1,CPU=4"]).await;
    let adds: Vec<_> = (0..6).map(|i| add::remote(&cx, i, i)).collect();
    let muls: Vec<_> = (0..6).map(|i| multiply::remote(&cx, i, 3)).collect();
    for (i, r) in adds.iter().enumerate() {
        assert_eq!(r.get().await.unwrap(), (2 * i as i64, "local-1".to_string()));
    }
    for (i, r) in muls.iter().enumerate() {
        assert_eq!(r.get().await.unwrap(), (3 * i as i64, "local-2".to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_never_runs_more_tasks_than_it_has_units() {
    let (_cluster, cx) = cluster(&["adder=2,CPU=8"]).await;
    let gate = gate("capacity");
    let refs: Vec<_> = (0..6).map(|_| gated::remote(&cx, "capacity".to_string())).collect();
    for released in 0..6 {
        // Once `released` tasks have finished, exactly two more have started (fewer at the
        // end): the others wait for a unit, however long the test takes.
        let expected_started = (released + 2).min(6);
        gate.until(|g| {
            let started = g.started.load(Ordering::SeqCst);
            started == expected_started && started - g.running.load(Ordering::SeqCst) == released
        })
        .await;
        assert!(gate.running.load(Ordering::SeqCst) <= 2);
        gate.permits.add_permits(1);
    }
    for r in &refs {
        assert!(r.get().await.unwrap() <= 2);
    }
    assert_eq!(gate.max_running.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refs_chain_into_a_graph() {
    let (_cluster, cx) = cluster(&["adder=2"]).await;
    let mut value = increment::remote(&cx, 0);
    for _ in 0..49 {
        value = increment::remote(&cx, &value);
    }
    assert_eq!(value.get().await.unwrap(), 50);
    // A fan-in: both arguments are refs.
    let a = add::remote(&cx, 1, 2);
    let b = multiply::call(2, 5).tag("iter0").remote(&cx);
    assert_eq!(a.get().await.unwrap().0, 3);
    // No multiplier in this cluster: the task is reported infeasible, never silently stuck.
    // Short waits repeat until the head's report has arrived (it is an event, not a delay).
    let reason = tokio::time::timeout(BOUND, async {
        loop {
            match b.get_timeout(Duration::from_millis(50)).await {
                Err(Error::Timeout { infeasible: Some(reason), .. }) => break reason,
                Err(Error::Timeout { infeasible: None, .. }) => continue,
                other => panic!("expected an infeasible timeout, got {other:?}"),
            }
        }
    })
    .await
    .expect("the head reports the task infeasible");
    assert!(reason.contains("multiplier"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_calls_do_not_deadlock_a_one_cpu_node() {
    let (_cluster, cx) = cluster(&["CPU=1,adder=1"]).await;
    assert_eq!(parent::remote(&cx, 4).get().await.unwrap(), 60);
    assert_eq!(sync_parent::remote(&cx, 20).get().await.unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_panics_fail_only_their_task() {
    let (_cluster, cx) = cluster(&["adder=1"]).await;
    match fails::remote(&cx, "disk on fire".to_string()).get().await {
        Err(Error::Task(TaskError::Application { function, message })) => {
            assert_eq!(function, "fails");
            assert_eq!(message, "disk on fire");
        }
        other => panic!("expected an application error, got {other:?}"),
    }
    match panics::remote(&cx, "oh no".to_string()).get().await {
        Err(Error::Task(TaskError::Panic { function, message })) => {
            assert_eq!(function, "panics");
            assert_eq!(message, "oh no");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    // A failed dependency fails its dependents with the cause.
    let failed = fails::remote(&cx, "first".to_string());
    match increment::remote(&cx, &failed).get().await {
        Err(Error::Task(TaskError::DependencyFailed { function, cause, .. })) => {
            assert_eq!(function, "increment");
            assert!(matches!(*cause, TaskError::Application { .. }));
        }
        other => panic!("expected a dependency error, got {other:?}"),
    }
    // The worker is still serving.
    assert_eq!(increment::remote(&cx, 1).get().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_travel_and_are_freed_when_refs_drop() {
    let (cluster, cx) = cluster(&["adder=1"]).await;
    let len = 3 << 20;
    let big = bytes::remote(&cx, len);
    let sum = checksum::remote(&cx, &big);
    let expected: u64 = (0..len).map(|i| (i % 251) as u64).sum();
    assert_eq!(sum.get().await.unwrap(), expected);
    assert_eq!(big.get().await.unwrap().len(), len);
    assert!(cluster.head().stats().result_bytes >= len);
    drop((big, sum));
    // The release is ordered before this request on the same stream, so it has arrived.
    let probe = increment::remote(&cx, 0);
    assert_eq!(probe.get().await.unwrap(), 1);
    let stats = cluster.head().stats();
    assert!(stats.result_bytes < len, "{stats:?}");
    assert_eq!(stats.tasks, 1, "only the probe is held: {stats:?}");
    drop(probe);
    cx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_ready_and_pending_like_ray() {
    let (_cluster, cx) = cluster(&["adder=4"]).await;
    let gate = gate("wait");
    let quick = increment::remote(&cx, 1);
    let slow: Vec<_> = (0..2).map(|_| gated::remote(&cx, "wait".to_string())).collect();
    quick.get().await.unwrap();
    let all = vec![slow[0].clone(), slow[1].clone()];
    let (ready, pending) = chia::wait(&all, 1, Some(Duration::from_millis(20))).await;
    assert!(ready.is_empty() && pending.len() == 2, "nothing finished while the gate is closed");
    gate.permits.add_permits(1);
    let (ready, pending) = chia::wait(&all, 1, None).await;
    assert_eq!((ready.len(), pending.len()), (1, 1));
    gate.permits.add_permits(1);
    let (ready, pending) = chia::wait(&all, 5, None).await;
    assert_eq!((ready.len(), pending.len()), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_no_node_has_is_a_clear_error() {
    let (cluster, cx) = cluster(&[]).await;
    let creds = cluster.credentials().clone();
    let _worker =
        chia::internals::Worker::connect_offering(&creds, "picky", resources("adder=1,CPU=1"), |spec| {
            spec.name != "increment"
        })
        .await
        .unwrap();
    match increment::remote(&cx, 1).get().await {
        Err(Error::Task(TaskError::UnknownFunction { function })) => assert_eq!(function, "increment"),
        other => panic!("expected an unknown-function error, got {other:?}"),
    }
    assert_eq!(add::remote(&cx, 1, 1).get().await.unwrap().0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_mismatch_names_the_function() {
    let (cluster, cx) = cluster(&[]).await;
    // A node built from other code: same name, another signature.
    let offer = chia::internals::core::protocol::WorkerOffer {
        resources: resources("adder=1,CPU=1"),
        functions: vec![chia::internals::core::FunctionKey::new("increment", "00000000deadbeef")],
        services: Vec::new(),
        head_node: false,
        labels: Default::default(),
    };
    let (_other, _executions) =
        chia::internals::Client::connect(cluster.credentials(), "other-build", Some(offer)).await.unwrap();
    match increment::remote(&cx, 1).get().await {
        Err(Error::Task(TaskError::SignatureMismatch { function, found, .. })) => {
            assert_eq!(function, "increment");
            assert_eq!(found, vec!["00000000deadbeef".to_string()]);
        }
        other => panic!("expected a signature mismatch, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_fails_its_running_tasks() {
    let (cluster, cx) = cluster(&["adder=1,CPU=1"]).await;
    let gate = gate("lost");
    // Not retried: with retries it would wait for another node with an adder.
    let running = gated::call("lost".to_string()).max_retries(chia::Retries::Never).remote(&cx);
    gate.until(|g| g.started.load(Ordering::SeqCst) == 1).await;
    cluster.workers()[0].shutdown().await;
    match running.get().await {
        Err(Error::Task(TaskError::WorkerLost { function, node, attempts, .. })) => {
            assert_eq!(function, "gated");
            assert_eq!(node, "local-1");
            assert_eq!(attempts, 1);
        }
        other => panic!("expected a worker-lost error, got {other:?}"),
    }
    gate.permits.add_permits(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_are_rejected_before_sending() {
    let (_cluster, cx) = cluster(&["adder=1"]).await;
    match increment::call(1).resource("bad name", 1.0).remote(&cx).get().await {
        Err(Error::Task(TaskError::InvalidCall { function, message })) => {
            assert_eq!(function, "increment");
            assert!(message.contains("bad name"), "{message}");
        }
        other => panic!("expected an invalid call, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_answers_while_the_head_lives_and_fails_after() {
    let (cluster, cx) = cluster(&["adder=1"]).await;
    cx.ping().await.expect("the head answers");
    let pending = gated::remote(&cx, "never-opened".to_string());
    cluster.shutdown();
    assert!(matches!(cx.ping().await, Err(Error::Disconnected(_))));
    // Nothing hangs: a result that can no longer arrive is an error too.
    assert!(matches!(pending.get().await, Err(Error::Disconnected(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_work_from_plain_threads() {
    let (_cluster, cx) = cluster(&["adder=1"]).await;
    let thread_cx = cx.clone();
    let answer = std::thread::spawn(move || {
        let first = increment::remote_blocking(&thread_cx, 40)?;
        increment::remote(&thread_cx, first).get_blocking()
    })
    .join()
    .expect("the thread does not panic");
    assert_eq!(answer.unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_exceptions_reruns_failed_calls_within_max_retries() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    // The function opts in: two failures, then the third attempt succeeds.
    assert_eq!(flaky::remote(&cx, "a".to_string(), 2).get_timeout(BOUND).await.unwrap(), 3);
    // More failures than max_retries allows: the last error is the answer.
    let error = flaky::call("b".to_string(), 5)
        .max_retries(chia::Retries::UpTo(1))
        .remote(&cx)
        .get_timeout(BOUND)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("attempt 2 fails"), "{error}");
    // A call can opt out: its first error is final.
    let error = flaky::call("c".to_string(), 1)
        .retry_exceptions(false)
        .remote(&cx)
        .get_timeout(BOUND)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("attempt 1 fails"), "{error}");
}
