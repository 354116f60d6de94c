//! Named services over real loopback QUIC: a head (with its own `head` node) and workers in
//! this process, driven through the public API.

extern crate chia_runtime as chia;

mod common;

use common::{BOUND, cluster};

use chia::{Context, Error, LocalCluster, ServiceOptions, TaskError};
use std::sync::LazyLock;
use tokio::sync::Semaphore;

/// A running total that remembers what was added: state kept across calls.
pub struct Counter {
    total: i64,
    history: Vec<i64>,
}

#[chia::service]
impl Counter {
    /// A counter at `start`, with no history.
    pub fn new(start: i64) -> Self {
        Counter { total: start, history: Vec::new() }
    }

    /// Adds `x`; returns the new total.
    pub fn add(&mut self, x: i64) -> i64 {
        self.total += x;
        self.history.push(x);
        self.total
    }

    /// The total (an async method).
    pub async fn total(&self) -> i64 {
        self.total
    }

    /// What was added, in order.
    pub fn history(&self) -> Vec<i64> {
        self.history.clone()
    }

    /// Panics with `message`: a method that fails.
    pub fn boom(&mut self, message: String) -> i64 {
        panic!("{message}")
    }

    /// The name of the node hosting the instance.
    pub fn where_am_i(&self, cx: &Context) -> String {
        cx.node_name().to_string()
    }

    /// Waits for a permit the test hands out, so a call can be kept running.
    pub async fn wait_for_permit(&mut self) -> i64 {
        PERMITS.acquire().await.expect("permits stay open").forget();
        self.total
    }
}

static PERMITS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(0));

/// A service whose calls run at the same time.
#[derive(Default)]
pub struct Board {
    hits: std::sync::atomic::AtomicU64,
}

static BOARD_PERMITS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(0));

#[chia::service(concurrent)]
impl Board {
    /// A board with no hits.
    pub fn new() -> Self {
        Board::default()
    }

    /// A slow call: waits for a permit the test hands out.
    pub async fn slow(&self) -> u64 {
        BOARD_PERMITS.acquire().await.expect("permits stay open").forget();
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counts a hit at once (while slow calls wait); returns the hits so far.
    pub fn hit(&self) -> u64 {
        self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }
}

/// Finds a counter by name from inside a task, the way a bypass provider would.
#[chia::function]
async fn read_counter_from_a_worker(cx: &Context, name: String) -> Result<Option<i64>, Error> {
    match CounterHandle::lookup(cx, &name, None).await? {
        Some(counter) => Ok(Some(counter.total().get().await?)),
        None => Ok(None),
    }
}

#[chia::function]
fn plus_one(x: i64) -> i64 {
    x + 1
}

/// Uses a counter it was handed, the way a Ray task uses an actor handle it received.
#[chia::function]
async fn add_through(counter: CounterHandle, x: i64) -> Result<i64, Error> {
    counter.add(x).get().await
}

/// What a call through a handed-over counter gives: its total, or the kind of its failure.
#[chia::function]
async fn try_through(counter: CounterHandle) -> String {
    match counter.add(1).get().await {
        Ok(total) => format!("total {total}"),
        Err(Error::Task(TaskError::ServiceUnavailable { service, .. })) => format!("unavailable: {service}"),
        Err(other) => format!("other: {other}"),
    }
}

/// Starts a counter on the worker and hands it back.
#[chia::function]
async fn start_counter(cx: &Context, name: String, start: i64) -> Result<CounterHandle, Error> {
    CounterHandle::start(cx, ServiceOptions::named(name).detached(), start).await
}

/// Handles inside other values travel with them.
#[chia::function]
async fn total_of_all(counters: Vec<CounterHandle>) -> Result<i64, Error> {
    let mut total = 0;
    for counter in &counters {
        total += counter.total().get().await?;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_keeps_state_and_runs_calls_one_at_a_time_in_order() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let counter = CounterHandle::start(&cx, ServiceOptions::named("counter"), 10).await.unwrap();
    let sums: Vec<_> = (1..=20).map(|x| counter.add(x)).collect();
    let mut expected = 10;
    for (x, sum) in (1..=20).zip(&sums) {
        expected += x;
        assert_eq!(sum.get().await.unwrap(), expected);
    }
    assert_eq!(counter.history().get().await.unwrap(), (1..=20).collect::<Vec<_>>());
    // A ref to a task's result is a valid argument: the call waits for it.
    let six = plus_one::remote(&cx, 5);
    assert_eq!(counter.add(&six).get().await.unwrap(), expected + 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_resolved_by_name_from_another_driver_and_from_a_worker() {
    let (cluster, cx) = cluster(&["CPU=2"]).await;
    let counter =
        CounterHandle::start(&cx, ServiceOptions::named("shared").namespace("team"), 1).await.unwrap();
    counter.add(41).get().await.unwrap();

    let other = cluster.driver().await.unwrap();
    let found = CounterHandle::lookup(&other, "shared", Some("team")).await.unwrap().expect("found by name");
    assert_eq!(found.total().get().await.unwrap(), 42);
    assert!(
        CounterHandle::lookup(&other, "shared", None).await.unwrap().is_none(),
        "namespaces separate names"
    );
    assert!(CounterHandle::lookup(&other, "nobody", Some("team")).await.unwrap().is_none());

    assert_eq!(read_counter_from_a_worker::remote(&cx, "missing".to_string()).get().await.unwrap(), None);
    let team = CounterHandle::start(&cx, ServiceOptions::named("from-worker"), 7).await.unwrap();
    assert_eq!(
        read_counter_from_a_worker::remote(&cx, "from-worker".to_string()).get().await.unwrap(),
        Some(7)
    );
    team.stop().await.unwrap();
}

/// Waits until the head has dropped the session of a driver that shut down.
async fn until_sessions(cluster: &LocalCluster, sessions: usize) {
    tokio::time::timeout(BOUND, async {
        while cluster.head().stats().sessions != sessions {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the head notices the driver left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_service_outlives_its_driver_and_a_job_scoped_one_does_not() {
    let (cluster, first) = cluster(&["CPU=2"]).await;
    let detached = CounterHandle::start(&first, ServiceOptions::named("kept").detached(), 5).await.unwrap();
    CounterHandle::start(&first, ServiceOptions::named("scoped"), 6).await.unwrap();
    detached.add(1).get().await.unwrap();
    let sessions_before = cluster.head().stats().sessions;
    first.shutdown().await;
    until_sessions(&cluster, sessions_before - 1).await;

    let second = cluster.driver().await.unwrap();
    let kept = CounterHandle::lookup(&second, "kept", None).await.unwrap().expect("a detached service stays");
    assert_eq!(kept.total().get().await.unwrap(), 6);
    assert!(CounterHandle::lookup(&second, "scoped", None).await.unwrap().is_none(), "it ended with its job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_if_exists_returns_the_running_service_and_names_do_not_collide() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let first = CounterHandle::start(&cx, ServiceOptions::named("once").detached(), 1).await.unwrap();
    first.add(1).get().await.unwrap();
    let again = CounterHandle::start(&cx, ServiceOptions::named("once").get_if_exists(), 100).await.unwrap();
    assert_eq!(again.service().id(), first.service().id());
    assert_eq!(again.total().get().await.unwrap(), 2, "the running instance, not a new one");
    match CounterHandle::start(&cx, ServiceOptions::named("once"), 1).await {
        Err(Error::Task(TaskError::InvalidCall { function, message })) => {
            assert_eq!(function, "Counter.new");
            assert!(message.contains("already runs"), "{message}");
        }
        other => panic!("expected a name collision, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_frees_the_name_and_later_calls_fail_clearly() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let counter = CounterHandle::start(&cx, ServiceOptions::named("temp"), 0).await.unwrap();
    counter.stop().await.unwrap();
    counter.stop().await.unwrap();
    assert!(CounterHandle::lookup(&cx, "temp", None).await.unwrap().is_none());
    match counter.add(1).get().await {
        Err(Error::Task(TaskError::ServiceUnavailable { service, .. })) => assert_eq!(service, "temp"),
        other => panic!("expected an unavailable service, got {other:?}"),
    }
    let fresh = CounterHandle::start(&cx, ServiceOptions::named("temp"), 50).await.unwrap();
    assert_eq!(fresh.add(1).get().await.unwrap(), 51);
    assert!(chia::stop_service(&cx, "temp", None).await.unwrap());
    assert!(!chia::stop_service(&cx, "temp", None).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_method_fails_that_call_and_the_service_keeps_serving() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let counter = CounterHandle::start(&cx, ServiceOptions::named("fragile"), 3).await.unwrap();
    match counter.boom("kaboom".to_string()).get().await {
        Err(Error::Task(TaskError::Panic { function, message })) => {
            assert_eq!(function, "Counter.boom");
            assert_eq!(message, "kaboom");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    assert_eq!(counter.add(1).get().await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_placed_by_resources_or_pinned_to_the_head() {
    let (_cluster, cx) = cluster(&["CPU=2", "CPU=2,gpu=1"]).await;
    let on_head = CounterHandle::start(&cx, ServiceOptions::named("h").on_head(), 0).await.unwrap();
    assert_eq!(on_head.service().node(), "head");
    assert_eq!(on_head.where_am_i().get().await.unwrap(), "head");
    let on_gpu = CounterHandle::start(&cx, ServiceOptions::named("g").resource("gpu", 1.0), 0).await.unwrap();
    assert_eq!(on_gpu.service().node(), "local-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_fails_its_service_calls_and_releases_the_name() {
    let (cluster, cx) = cluster(&["CPU=2,svc=1"]).await;
    let counter =
        CounterHandle::start(&cx, ServiceOptions::named("doomed").resource("svc", 1.0), 0).await.unwrap();
    assert_eq!(counter.service().node(), "local-1");
    let waiting = counter.wait_for_permit();
    // The call is running once a later call has to queue behind it; shut the node down then.
    cluster.workers()[0].shutdown().await;
    match waiting.get().await {
        Err(Error::Task(TaskError::WorkerLost { function, node, attempts, .. })) => {
            assert_eq!(function, "Counter.wait_for_permit");
            assert_eq!(node, "local-1");
            assert_eq!(attempts, 1);
        }
        Err(Error::Task(TaskError::ServiceUnavailable { .. })) => {}
        other => panic!("expected the call to fail with its node, got {other:?}"),
    }
    assert!(CounterHandle::lookup(&cx, "doomed", None).await.unwrap().is_none(), "the name is released");
    match counter.add(1).get().await {
        Err(Error::Task(TaskError::ServiceUnavailable { .. })) => {}
        other => panic!("expected an unavailable service, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_service_does_not_hold_small_calls_behind_a_slow_one() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let board = BoardHandle::start(&cx, ServiceOptions::named("board")).await.unwrap();
    let slow = board.slow();
    // These complete while the slow call is still waiting for its permit.
    for expected in 1..=5 {
        assert_eq!(board.hit().get().await.unwrap(), expected);
    }
    BOARD_PERMITS.add_permits(1);
    assert_eq!(slow.get().await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_max_restarts_is_recreated_elsewhere_and_its_handle_keeps_working() {
    let (cluster, cx) = cluster(&["CPU=2,svc=1", "CPU=2,svc=1"]).await;
    let options = ServiceOptions::named("phoenix").resource("svc", 1.0).max_restarts(chia::Retries::UpTo(1));
    let counter = CounterHandle::start(&cx, options, 10).await.unwrap();
    assert_eq!(counter.add(5).get().await.unwrap(), 15);
    let (lost, other) = match counter.service().node() {
        "local-1" => (0, 1),
        _ => (1, 0),
    };
    let sessions = cluster.head().stats().sessions;
    cluster.workers()[lost].shutdown().await;
    until_sessions(&cluster, sessions - 1).await;
    // The same handle reaches the new instance (a call made while it starts waits for it);
    // it starts from its constructor, so the state kept in memory is gone.
    assert_eq!(counter.add(1).get_timeout(BOUND).await.unwrap(), 11);
    assert_eq!(counter.where_am_i().get().await.unwrap(), cluster.workers()[other].node_name());
    let found = CounterHandle::lookup(&cx, "phoenix", None).await.unwrap().expect("the name stays");
    assert_eq!(found.service().id(), counter.service().id());

    // Its one restart is used: losing this node too ends it and frees the name.
    cluster.workers()[other].shutdown().await;
    until_sessions(&cluster, sessions - 2).await;
    assert!(CounterHandle::lookup(&cx, "phoenix", None).await.unwrap().is_none());
    assert!(matches!(
        counter.add(1).get_timeout(BOUND).await,
        Err(Error::Task(TaskError::ServiceUnavailable { .. }))
    ));
}

/// Counts constructions; the first one waits for a gate that is never opened, so the node it
/// runs on can be lost mid-construction.
pub struct SlowToBuild {
    n: i64,
}

static SLOW_BUILDS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static SLOW_STARTED: Semaphore = Semaphore::const_new(0);
static NEVER_OPENS: Semaphore = Semaphore::const_new(0);

#[chia::service]
impl SlowToBuild {
    /// Notes the node it is built on; the first construction never finishes.
    pub async fn new(cx: &Context, n: i64) -> Self {
        let first = {
            let mut builds = SLOW_BUILDS.lock().unwrap();
            builds.push(cx.node_name().to_string());
            builds.len() == 1
        };
        SLOW_STARTED.add_permits(1);
        if first {
            let _ = NEVER_OPENS.acquire().await;
        }
        SlowToBuild { n }
    }

    /// The `n` it was built with.
    pub fn get(&self) -> i64 {
        self.n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_during_construction_restarts_the_service_and_answers_its_start() {
    let (cluster, cx) = cluster(&["CPU=2,slow=1", "CPU=2,slow=1"]).await;
    let driver = cx.clone();
    let start = tokio::spawn(async move {
        let options =
            ServiceOptions::named("slow").resource("slow", 1.0).max_restarts(chia::Retries::UpTo(1));
        SlowToBuildHandle::start(&driver, options, 7).await
    });
    SLOW_STARTED.acquire().await.unwrap().forget();
    let first_node = SLOW_BUILDS.lock().unwrap()[0].clone();
    let lost = cluster.workers().iter().position(|w| w.node_name() == first_node).unwrap();
    cluster.workers()[lost].shutdown().await;
    let handle = tokio::time::timeout(BOUND, start).await.expect("start() is answered").unwrap().unwrap();
    assert_eq!(handle.service().node(), cluster.workers()[1 - lost].node_name());
    assert_eq!(handle.get().get().await.unwrap(), 7);
}

/// Its constructor waits for the test; its drop is reported.
pub struct HeldOpen;

static HELD_STARTED: Semaphore = Semaphore::const_new(0);
static HELD_GATE: Semaphore = Semaphore::const_new(0);
static HELD_DROPPED: Semaphore = Semaphore::const_new(0);

impl Drop for HeldOpen {
    fn drop(&mut self) {
        HELD_DROPPED.add_permits(1);
    }
}

#[chia::service]
impl HeldOpen {
    /// Says it started, then waits for the test's gate.
    pub async fn new() -> Self {
        HELD_STARTED.add_permits(1);
        HELD_GATE.acquire().await.unwrap().forget();
        HeldOpen
    }

    /// Answers 1.
    pub fn ping(&self) -> i64 {
        1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_job_ended_during_construction_is_dropped_and_frees_its_node() {
    let (cluster, cx) = cluster(&["CPU=2,held=1"]).await;
    let leaving = cluster.driver().await.unwrap();
    let sessions = cluster.head().stats().sessions;
    let starter = leaving.clone();
    let _start = tokio::spawn(async move {
        HeldOpenHandle::start(&starter, ServiceOptions::named("held").resource("held", 1.0)).await
    });
    HELD_STARTED.acquire().await.unwrap().forget();
    leaving.shutdown().await;
    until_sessions(&cluster, sessions - 1).await;
    // The constructor finishes after its job ended: the host is told to drop the instance.
    HELD_GATE.add_permits(1);
    tokio::time::timeout(BOUND, HELD_DROPPED.acquire())
        .await
        .expect("the instance is dropped")
        .unwrap()
        .forget();
    // And its resource is free again for the next service.
    HELD_GATE.add_permits(1);
    let next = HeldOpenHandle::start(&cx, ServiceOptions::named("held-again").resource("held", 1.0));
    let next = tokio::time::timeout(BOUND, next).await.expect("the resource was freed").unwrap();
    assert_eq!(next.ping().get().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_passed_to_a_task_works_there_and_one_returned_by_a_task_works_here() {
    let (cluster, cx) = cluster(&["CPU=2", "CPU=2"]).await;
    let counter = CounterHandle::start(&cx, ServiceOptions::named("passed"), 10).await.unwrap();
    assert_eq!(add_through::remote(&cx, counter.clone(), 5).get().await.unwrap(), 15);
    assert_eq!(counter.total().get().await.unwrap(), 15, "the task's call reached the same instance");

    // A handle made on a worker comes back as a value and is bound to the driver that got it.
    let made = start_counter::remote(&cx, "made-in-a-task".to_string(), 100).get().await.unwrap();
    assert_eq!(made.service().name(), "made-in-a-task");
    assert_eq!(made.add(1).get().await.unwrap(), 101);
    // A handle inside a collection, and one that went through a ref, chained to another task.
    let chained = start_counter::remote(&cx, "chained".to_string(), 1000);
    assert_eq!(add_through::remote(&cx, &chained, 1).get().await.unwrap(), 1001);
    assert_eq!(total_of_all::remote(&cx, vec![counter.clone(), made.clone()]).get().await.unwrap(), 15 + 101);

    // Another driver can use a handle it got from a task, too.
    let other = cluster.driver().await.unwrap();
    let seen_elsewhere = start_counter::remote(&other, "for-the-other".to_string(), 7).get().await.unwrap();
    assert_eq!(seen_elsewhere.total().get().await.unwrap(), 7);

    // Outside a call's arguments or result there is nothing to bind a handle to.
    let bytes = rmp_serde::to_vec_named(&counter).unwrap();
    let error = rmp_serde::from_slice::<CounterHandle>(&bytes).unwrap_err().to_string();
    assert!(error.contains("\"passed\"") && error.contains("can only be decoded"), "{error}");

    // A handle is only ever of its service's type: the check a handle makes on arrival.
    match BoardHandle::lookup(&cx, "passed", None).await {
        Err(Error::Task(TaskError::InvalidCall { message, .. })) => {
            assert!(message.contains("is a Counter") && message.contains("not a Board"), "{message}")
        }
        other => panic!("expected a type mismatch, got {other:?}"),
    }

    // A handle whose service stopped since fails its calls with the service's name.
    counter.stop().await.unwrap();
    assert_eq!(try_through::remote(&cx, counter.clone()).get().await.unwrap(), "unavailable: passed");
    for name in ["made-in-a-task", "chained", "for-the-other"] {
        assert!(chia::stop_service(&cx, name, None).await.unwrap(), "{name} ran");
    }
}
