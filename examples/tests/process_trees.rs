//! Every process a task starts ends with it — started through `cx.spawn`, through a plain
//! `std::process::Command`, or daemonized with `setsid` — when the task is cancelled, when it
//! runs past its timeout, and when its worker process is SIGKILLed. Each case runs on a real worker process (the examples'
//! `worker` binary) under each containment mechanism: cgroup (skipped, saying why, where the
//! machine has no usable cgroup2) and the fallback (forced with `CHIA_PROCESS_CONTAINMENT`).

use chia::Context;
use chia::internals::Client;
use chia::internals::HeadOptions;
use chia::internals::HeadWithNode;
use chia::internals::tls::{ClusterCredentials, HeadCredentials};
use examples::tools::{tool_tree_async, tool_tree_sync};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bounds every wait; never a way to wait for something to happen.
const BOUND: Duration = Duration::from_secs(60);
/// How soon after its worker's SIGKILL a task's processes must be gone.
const AFTER_KILL: Duration = Duration::from_secs(5);
/// The timeout of a tool tree's call: far longer than starting the tree takes (milliseconds),
/// so the tree is seen whole before the timeout stops it.
const TREE_TIMEOUT: Duration = Duration::from_secs(3);

/// A worker process; killed on drop, so a failing test leaves none.
struct WorkerProcess {
    child: Child,
    containment: String,
}

impl WorkerProcess {
    /// Starts a worker with `CHIA_PROCESS_CONTAINMENT=mode` and waits for its ready line.
    fn start(cluster_file: &Path, mode: &str) -> WorkerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .arg("--cluster-file")
            .arg(cluster_file)
            .args(["--name", "tools", "--resources", "CPU=2"])
            .env("RUST_LOG", "info")
            .env("CHIA_PROCESS_CONTAINMENT", mode)
            .env_remove("CHIA_ADDRESS")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the worker binary starts");
        let stdout = child.stdout.take().expect("piped");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        let line = lines.recv_timeout(BOUND).expect("the worker prints its ready line");
        assert!(line.contains("chia-worker ready"), "{line}");
        let containment = line.rsplit_once("containment=").expect("the line names the containment").1;
        WorkerProcess { child, containment: containment.trim().to_string() }
    }

    fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the worker");
        self.child.wait().expect("reap the worker");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the pids a test learnt of if it fails before they are gone.
struct PidGuard(Vec<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if is_running(pid) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

/// Running, or a zombie that nobody has reaped yet (which runs nothing).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// How long until none of `pids` runs; `None` if some still run at `bound`.
async fn gone_within(pids: &[u32], bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if !pids.iter().any(|&pid| is_running(pid)) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The pid in `dir/name`, once the task has renamed it into place.
async fn pid_in(dir: &Path, name: &str) -> u32 {
    let path = dir.join(name);
    let deadline = Instant::now() + BOUND;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text.trim().parse().expect("a pid");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} was never written", path.display());
}

/// The shell, the `setsid` daemon and the plain helper of a running tool tree.
async fn tree_pids(dir: &Path) -> Vec<u32> {
    let pids = vec![pid_in(dir, "shell").await, pid_in(dir, "daemon").await, pid_in(dir, "helper").await];
    for &pid in &pids {
        assert!(is_running(pid), "{pid} should run while its task does");
    }
    // The daemon really left the shell's session and group: process groups alone miss it.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pids[1])).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[3], pids[1].to_string(), "the daemon leads its own session");
    pids
}

/// A head in this process and a worker process joined to it.
struct Cluster {
    _head: HeadWithNode,
    worker: WorkerProcess,
    driver: Context,
    _state: tempfile::TempDir,
}

async fn cluster(mode: &str) -> Cluster {
    let state = tempfile::tempdir().unwrap();
    let credentials = HeadCredentials::load_or_create(state.path()).expect("credentials");
    let head = HeadWithNode::start("127.0.0.1:0".parse().unwrap(), credentials, HeadOptions::default())
        .await
        .expect("the head starts");
    let cluster_file = state.path().join("cluster.yaml");
    let handle = head.head();
    handle.cluster_credentials(&handle.address().to_string()).save(&cluster_file).expect("cluster file");
    let worker = WorkerProcess::start(&cluster_file, mode);
    let credentials = ClusterCredentials::load(&cluster_file).unwrap();
    let (client, _) = Client::connect(&credentials, "driver", None).await.expect("driver connects");
    Cluster { _head: head, worker, driver: Context::from_client(client), _state: state }
}

/// The cluster for `mechanism`, or `None` (printed as skipped) where it cannot run here.
async fn cluster_with(mechanism: &str) -> Option<Cluster> {
    let mode = if mechanism == "cgroup" { "auto" } else { mechanism };
    let cluster = cluster(mode).await;
    if cluster.worker.containment != mechanism {
        // Counted as skipped, and said so: the fallback tests still run.
        println!(
            "SKIPPED: the worker found no usable cgroup2 here (it uses {}); see its log for why",
            cluster.worker.containment
        );
        return None;
    }
    Some(cluster)
}

#[derive(Clone, Copy)]
enum Function {
    Sync,
    Async,
}

fn submit(cx: &Context, function: Function, dir: &Path) -> chia::ObjectRef<String> {
    submit_with_timeout(cx, function, dir, None)
}

fn submit_with_timeout(
    cx: &Context,
    function: Function,
    dir: &Path,
    timeout: Option<Duration>,
) -> chia::ObjectRef<String> {
    let dir = dir.display().to_string();
    let with_timeout = |call: chia::Call<String>| match timeout {
        Some(limit) => call.timeout(limit),
        None => call,
    };
    match function {
        Function::Sync => with_timeout(tool_tree_sync::call(dir)).remote(cx),
        Function::Async => with_timeout(tool_tree_async::call(dir)).remote(cx),
    }
}

async fn cancelling_ends_the_tree(mechanism: &str, function: Function) {
    let Some(cluster) = cluster_with(mechanism).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let running = submit(&cluster.driver, function, dir.path());
    let guard = PidGuard(tree_pids(dir.path()).await);
    running.cancel().unwrap();
    let error = running.get_timeout(BOUND).await.expect_err("a cancelled task fails");
    assert!(matches!(error, chia::Error::Task(chia::TaskError::Cancelled { .. })), "{error:?}");
    let took = gone_within(&guard.0, BOUND).await;
    let left: Vec<_> = guard.0.iter().filter(|&&p| is_running(p)).collect();
    assert!(took.is_some(), "{mechanism}: still running after the cancellation: {left:?}");
    println!("{mechanism}: the cancelled task's tree was gone {:?} after its answer", took.unwrap());
}

async fn a_timeout_ends_the_tree(mechanism: &str, function: Function) {
    let Some(cluster) = cluster_with(mechanism).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let running = submit_with_timeout(&cluster.driver, function, dir.path(), Some(TREE_TIMEOUT));
    // Seen running whole, before the timeout (which a machine 1000 times slower than usual
    // would miss, failing here and saying so).
    let guard = PidGuard(tree_pids(dir.path()).await);
    let error = running.get_timeout(BOUND).await.expect_err("a task that runs past its timeout fails");
    match &error {
        chia::Error::Task(chia::TaskError::TimedOut { timeout_ms, attempt, .. }) => {
            assert_eq!((*timeout_ms, *attempt), (TREE_TIMEOUT.as_millis() as u64, 1), "{error}");
        }
        other => panic!("{mechanism}: expected TimedOut, got {other:?}"),
    }
    // SIGKILLed before the answer was sent; the kernel may still be taking the last of them
    // down as it arrives.
    let took = gone_within(&guard.0, AFTER_KILL).await;
    let left: Vec<_> = guard.0.iter().filter(|&&p| is_running(p)).collect();
    assert!(took.is_some(), "{mechanism}: still running {AFTER_KILL:?} after the timeout's answer: {left:?}");
    println!("{mechanism}: the timed-out task's tree was gone {:?} after its answer", took.unwrap());
}

async fn killing_the_worker_ends_the_tree(mechanism: &str, function: Function) {
    let Some(mut cluster) = cluster_with(mechanism).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let _running = submit(&cluster.driver, function, dir.path());
    let guard = PidGuard(tree_pids(dir.path()).await);
    let killed = Instant::now();
    cluster.worker.sigkill();
    let took = gone_within(&guard.0, AFTER_KILL).await;
    let left: Vec<_> = guard.0.iter().filter(|&&p| is_running(p)).collect();
    assert!(took.is_some(), "{mechanism}: still running {AFTER_KILL:?} after the worker's SIGKILL: {left:?}");
    println!("{mechanism}: the tree was gone {:?} after the worker's SIGKILL", killed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_cancel_ends_a_sync_tree() {
    cancelling_ends_the_tree("cgroup", Function::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_cancel_ends_an_async_tree() {
    cancelling_ends_the_tree("cgroup", Function::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_worker_sigkill_ends_the_tree() {
    killing_the_worker_ends_the_tree("cgroup", Function::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_timeout_ends_a_sync_tree() {
    a_timeout_ends_the_tree("cgroup", Function::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_timeout_ends_an_async_tree() {
    a_timeout_ends_the_tree("cgroup", Function::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_timeout_ends_a_sync_tree() {
    a_timeout_ends_the_tree("fallback", Function::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_timeout_ends_an_async_tree() {
    a_timeout_ends_the_tree("fallback", Function::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_cancel_ends_a_sync_tree() {
    cancelling_ends_the_tree("fallback", Function::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_cancel_ends_an_async_tree() {
    cancelling_ends_the_tree("fallback", Function::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_worker_sigkill_ends_the_tree() {
    killing_the_worker_ends_the_tree("fallback", Function::Async).await;
}

/// Where the driver process of [`a_departed_drivers_tools_end_within_seconds`] finds its
/// cluster file and the directory its task writes the tool tree's pids to.
const DRIVER_CLUSTER_FILE: &str = "CHIA_TEST_DRIVER_CLUSTER_FILE";
const DRIVER_TREE_DIR: &str = "CHIA_TEST_DRIVER_TREE_DIR";

/// Not a test of its own: the driver process that
/// [`a_departed_drivers_tools_end_within_seconds`] starts (this test binary, with `--ignored`)
/// and SIGKILLs. It submits a tool tree and waits for ever, as a driver in a long loop does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the driver process of a_departed_drivers_tools_end_within_seconds, which runs it"]
async fn driver_process_that_is_killed() {
    let (Ok(cluster_file), Ok(dir)) = (std::env::var(DRIVER_CLUSTER_FILE), std::env::var(DRIVER_TREE_DIR))
    else {
        println!(
            "SKIPPED: a role of a_departed_drivers_tools_end_within_seconds, which starts it with its cluster"
        );
        return;
    };
    let credentials = ClusterCredentials::load(Path::new(&cluster_file)).unwrap();
    let (client, _) = Client::connect(&credentials, "doomed-driver", None).await.expect("driver connects");
    let cx = Context::from_client(client);
    let running = tool_tree_sync::remote(&cx, dir);
    let outcome = running.get_timeout(BOUND).await;
    panic!("the driver was to be killed while its task ran, but the task ended: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_drivers_tools_end_within_seconds() {
    let state = tempfile::tempdir().unwrap();
    let credentials = HeadCredentials::load_or_create(state.path()).expect("credentials");
    let head = HeadWithNode::start("127.0.0.1:0".parse().unwrap(), credentials, HeadOptions::default())
        .await
        .expect("the head starts");
    let cluster_file = state.path().join("cluster.yaml");
    let handle = head.head();
    handle.cluster_credentials(&handle.address().to_string()).save(&cluster_file).expect("cluster file");
    let _worker = WorkerProcess::start(&cluster_file, "auto");
    let dir = tempfile::tempdir().unwrap();
    let mut driver = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "driver_process_that_is_killed", "--nocapture"])
        .env(DRIVER_CLUSTER_FILE, &cluster_file)
        .env(DRIVER_TREE_DIR, dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("the driver process starts");
    let guard = PidGuard(tree_pids(dir.path()).await);
    // SIGKILL: the driver says nothing on its way out, the head must notice by itself.
    driver.kill().expect("SIGKILL the driver");
    driver.wait().expect("reap the driver");
    let killed = Instant::now();
    let took = gone_within(&guard.0, Duration::from_secs(20)).await;
    let left: Vec<_> = guard.0.iter().filter(|&&p| is_running(p)).collect();
    assert!(took.is_some(), "its tools still run 20 s after the driver's SIGKILL: {left:?}");
    println!("a SIGKILLed driver's tools were gone {:?} after it died", killed.elapsed());
}
