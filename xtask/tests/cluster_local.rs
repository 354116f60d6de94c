//! Runs `cargo xtask cluster-local` for real: a head and two worker processes, with the
//! quickstart example run against them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

#[test]
fn cluster_local_runs_a_command_against_real_processes() {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["cluster-local", "--workers", "2", "--resources", "adder=2,multiplier=1", "--", "quickstart"])
        .env_remove("CHIA_ADDRESS")
        .env_remove("CHIA_CLUSTER_FILE")
        .output()
        .expect("xtask runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "xtask failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    // The quickstart connected to the xtask's cluster, not an embedded one.
    assert!(stdout.contains("ran on worker-1") && stdout.contains("ran on worker-2"), "{stdout}");
    assert!(stdout.contains("sum_of_squares(5)     =  55"), "{stdout}");
    assert!(stdout.contains("simple_multiply(.,10) =  30"), "{stdout}");
    // Each process's log is prefixed and the cluster was torn down.
    assert!(stderr.contains("[head] ") && stderr.contains("[worker-1] "), "{stderr}");
    assert!(stderr.contains("stopping the cluster"), "{stderr}");
}

#[test]
fn cluster_local_reports_a_bad_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cluster.yaml");
    std::fs::write(&config, "workers:\n  - count: 2\n    resourcez: {adder: 1}\n").expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["cluster-local", "--config"])
        .arg(&config)
        .args(["--", "true"])
        .output()
        .expect("xtask runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cluster.yaml") && stderr.contains("resourcez"), "{stderr}");
}

// ---------------------------------------------------------------------------- stop signals

/// Bounds every wait below; never a way to wait for something to happen.
const BOUND: std::time::Duration = std::time::Duration::from_secs(240);

/// A `cargo xtask cluster-local` running in the background, and its stderr line by line.
///
/// Dropped — a failed assertion included — it kills what is left: xtask's whole process tree
/// while xtask runs, and every process a test saw through [`ClusterLocal::processes`], so a
/// failing test leaves nothing running behind it.
struct ClusterLocal {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    exited: bool,
    known: Vec<ProcessId>,
}

impl ClusterLocal {
    fn start(extra: &[&str]) -> ClusterLocal {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["cluster-local", "--workers", "2", "--resources", "adder=1"])
            .args(extra)
            .env_remove("CHIA_ADDRESS")
            .env_remove("CHIA_CLUSTER_FILE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("xtask runs");
        let stderr = child.stderr.take().expect("piped");
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        ClusterLocal { child, lines, seen: Vec::new(), exited: false, known: Vec::new() }
    }

    /// Every process descended from xtask now, remembered so that a panic later kills it.
    fn processes(&mut self) -> Vec<ProcessId> {
        let now = descendants(self.child.id());
        for &process in &now {
            if !self.known.contains(&process) {
                self.known.push(process);
            }
        }
        now
    }

    /// Waits for the next line containing `text` and returns it.
    fn wait_for_line(&mut self, text: &str) -> String {
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(e) => {
                    panic!("no line with {text:?} from xtask ({e}); it printed:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -s {name}");
    }

    /// Waits until xtask has exited (its stderr closes, then it is reaped) and returns its status.
    fn wait_for_exit(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("xtask did not exit; it printed:\n{}", self.seen.join("\n"));
                }
            }
        }
        let status = self.child.wait().expect("xtask is reaped");
        self.exited = true;
        (status, self.seen.clone())
    }
}

impl Drop for ClusterLocal {
    fn drop(&mut self) {
        if !self.exited {
            // Frozen first, so that nothing forks, or is reparented out of the tree, while the
            // tree is collected; then killed.
            let root = ProcessId { pid: self.child.id(), started: stat(self.child.id()).map_or(0, |s| s.1) };
            send(root, libc::SIGSTOP);
            loop {
                let new: Vec<ProcessId> = descendants(root.pid)
                    .into_iter()
                    .filter(|process| !self.known.contains(process))
                    .collect();
                if new.is_empty() {
                    break;
                }
                for &process in &new {
                    send(process, libc::SIGSTOP);
                }
                self.known.extend(new);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for &process in &self.known {
            kill_and_wait(process);
        }
        // A killed xtask could not remove its state directory, which holds the credentials.
        if let Some(state_dir) = self.seen.iter().find_map(|line| state_dir_of(line))
            && state_dir.exists()
        {
            let _ = std::fs::remove_dir_all(&state_dir);
        }
    }
}

/// The state directory named by xtask's `CHIA_CLUSTER_FILE=` line, if `line` is that line.
fn state_dir_of(line: &str) -> Option<std::path::PathBuf> {
    let file = std::path::PathBuf::from(line.split("CHIA_CLUSTER_FILE=").nth(1)?.trim());
    let dir = file.parent()?.to_path_buf();
    dir.file_name()?.to_str()?.starts_with("chia-cluster-").then_some(dir)
}

/// Kills `process` (if it still is that process) and waits until it has ended, at most
/// [`BOUND`]: through a pidfd, which holds the pid (no reuse meanwhile) and becomes readable
/// when the process exits, though it is not this test's child.
fn kill_and_wait(process: ProcessId) {
    let Ok(pid) = libc::pid_t::try_from(process.pid) else { return };
    let Some(pidfd) = pidfd_open(pid) else {
        return; // Gone already.
    };
    if still_running(process) {
        kill_through_pidfd(&pidfd, BOUND);
    }
}

/// pidfd_open(2): a descriptor that holds `pid`; `None` if there is no such process.
#[allow(unsafe_code)]
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = libc::c_int::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` was just opened by pidfd_open and is owned by nothing else; the OwnedFd
    // closes it once, when dropped.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends SIGKILL to the process of `pidfd` and waits until it has exited, at most `bound`.
#[allow(unsafe_code)]
fn kill_through_pidfd(pidfd: &OwnedFd, bound: std::time::Duration) {
    let fd = pidfd.as_raw_fd();
    let null = std::ptr::null::<libc::siginfo_t>();
    let mut ready = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let timeout = libc::c_int::try_from(bound.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is a pidfd that `pidfd` keeps open across both calls; pidfd_send_signal
    // takes a null siginfo (the kernel fills in a default); `ready` is one live, writable
    // pollfd, as the count of 1 says.
    unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGKILL, null, 0);
        libc::poll(&mut ready, 1, timeout);
    }
}

/// Sends `signal` to `process` if it is still that process (not a reused pid) and running.
fn send(process: ProcessId, signal: libc::c_int) {
    if still_running(process)
        && let Ok(pid) = libc::pid_t::try_from(process.pid)
    {
        kill(pid, signal);
    }
}

/// kill(2); a process already gone is ignored.
#[allow(unsafe_code)]
fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) };
}

/// A process as /proc shows it: its pid and its start time (so a reused pid is not mistaken
/// for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcessId {
    pid: u32,
    started: u64,
}

/// (parent pid, start time, state) of `pid`, if it exists.
fn stat(pid: u32) -> Option<(u32, u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything; the fields follow the last ')'.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?, state))
}

/// Every process descended from `root`, now.
fn descendants(root: u32) -> Vec<ProcessId> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Some(pid) = entry.ok().and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            continue;
        };
        if let Some((parent, started, _)) = stat(pid) {
            all.push((pid, parent, started));
        }
    }
    let mut found: Vec<ProcessId> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, started) in &all {
            if ppid == parent {
                found.push(ProcessId { pid, started });
                frontier.push(pid);
            }
        }
    }
    found
}

/// The command line of `pid`, for messages.
fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    format!("{pid}: {}", String::from_utf8_lossy(&raw).replace('\0', " ").trim_end())
}

/// Whether `process` still runs (a zombie has ended: only its exit status is left).
fn still_running(process: ProcessId) -> bool {
    stat(process.pid).is_some_and(|(_, started, state)| started == process.started && state != 'Z')
}

/// A command that starts a background job (`sleep 600`, in the command's process group; with
/// `ignore_term`, deaf to SIGTERM), says so on stderr, and waits.
fn command_with_background_job(ignore_term: bool) -> Vec<String> {
    let job = if ignore_term { "(trap '' TERM; exec sleep 600)" } else { "sleep 600" };
    // Echoed in two words: xtask's own "running [...]" line quotes the script, which then does
    // not hold BACKGROUND_JOB as it is.
    let (first, rest) = BACKGROUND_JOB.split_once(' ').expect("two words");
    let script = format!("{job} >/dev/null 2>&1 </dev/null & echo '{first}' \"{rest} $!\" >&2; wait");
    ["--", "sh", "-c", &script].map(str::to_string).to_vec()
}

/// The processes of the cluster itself: the head, and two workers each with its sentinel (the
/// process that ends what a SIGKILLed worker left; see ARCHITECTURE.md, "Cancellation and processes").
const CLUSTER_PROCESSES: usize = 1 + 2 * 2;

/// What [`command_with_background_job`] prints once its job runs.
const BACKGROUND_JOB: &str = "xtask-test: background job";

/// Starts cluster-local with `extra` arguments, waits for `ready`, sends `signal`, and checks
/// that xtask exits with `128 + signo`, leaving no process it started — nor any they started —
/// and no state directory.
fn stop_with(signal: &str, signal_number: i32, extra: &[String], ready: &str, expected_processes: usize) {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut cluster = ClusterLocal::start(&extra);
    let connect = cluster.wait_for_line("CHIA_CLUSTER_FILE=");
    let state_dir =
        state_dir_of(&connect).unwrap_or_else(|| panic!("no chia-cluster-* state directory in {connect}"));
    assert!(state_dir.join("cluster.yaml").exists(), "{}", state_dir.display());
    cluster.wait_for_line(ready);

    let processes = cluster.processes();
    let commands: Vec<String> = processes.iter().map(|process| command_line(process.pid)).collect();
    assert_eq!(processes.len(), expected_processes, "{commands:?}\n{}", cluster.seen.join("\n"));
    cluster.signal(signal);
    let (status, seen) = cluster.wait_for_exit();
    let log = seen.join("\n");
    assert_eq!(status.code(), Some(128 + signal_number), "{log}");
    assert!(log.contains(&format!("xtask: SIG{signal}: stopping the cluster")), "{log}");
    let left: Vec<ProcessId> = processes.into_iter().filter(|&process| still_running(process)).collect();
    assert!(left.is_empty(), "still running after {signal}: {left:?}\n{log}");
    assert!(!state_dir.exists(), "{} is left behind\n{log}", state_dir.display());
}

#[test]
fn sigterm_stops_the_cluster_and_what_its_processes_started_and_removes_the_state_directory() {
    // The cluster, the command and its background job, which ignores SIGTERM: it is killed
    // with its group after the grace period.
    stop_with("TERM", 15, &command_with_background_job(true), BACKGROUND_JOB, CLUSTER_PROCESSES + 2);
}

#[test]
fn sighup_stops_the_running_command_and_its_background_job_too() {
    // The cluster, the command and its background job.
    stop_with("HUP", 1, &command_with_background_job(false), BACKGROUND_JOB, CLUSTER_PROCESSES + 2);
}

#[test]
fn sigint_stops_the_cluster_like_ctrl_c() {
    stop_with("INT", 2, &[], "press Ctrl-C to stop the cluster", CLUSTER_PROCESSES);
}

#[test]
fn sigterm_with_no_command_stops_the_head_and_the_workers() {
    stop_with("TERM", 15, &[], "press Ctrl-C to stop the cluster", CLUSTER_PROCESSES);
}

/// The guard itself: a test that panics while the cluster runs leaves no process and no state
/// directory behind.
#[test]
fn a_test_that_panics_leaves_nothing_running() {
    let mut seen = Vec::new();
    let mut state_dir = None;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let command = command_with_background_job(true);
        let mut cluster = ClusterLocal::start(&command.iter().map(String::as_str).collect::<Vec<_>>());
        state_dir = state_dir_of(&cluster.wait_for_line("CHIA_CLUSTER_FILE="));
        cluster.wait_for_line(BACKGROUND_JOB);
        let xtask =
            ProcessId { pid: cluster.child.id(), started: stat(cluster.child.id()).expect("xtask runs").1 };
        seen = cluster.processes();
        seen.push(xtask);
        panic!("a failing assertion, with the cluster running");
    }));
    assert!(panicked.is_err());
    // xtask, the cluster, the command and its background job.
    assert_eq!(seen.len(), 1 + CLUSTER_PROCESSES + 2, "{seen:?}");
    // The guard returns once each has ended.
    let left: Vec<ProcessId> = seen.iter().copied().filter(|&process| still_running(process)).collect();
    assert!(left.is_empty(), "left running by a panicking test: {left:?}");
    let state_dir = state_dir.expect("the state directory was printed");
    assert!(!state_dir.exists(), "{} is left behind", state_dir.display());
}

// ------------------------------------------------------------------------ the chia command

/// Runs the `chia` command that cluster-local built beside its other binaries, against the
/// cluster in `cluster_file`, and returns its standard output parsed as JSON.
fn chia_json(cluster_file: &str, args: &[&str]) -> serde_json::Value {
    let output = chia(Some(cluster_file), args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "chia {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("chia {args:?} printed no JSON ({e}):\n{stdout}"))
}

fn chia(cluster_file: Option<&str>, args: &[&str]) -> std::process::Output {
    let binary = chia_binary();
    let mut command = Command::new(&binary);
    command.args(args).env_remove("CHIA_ADDRESS").env_remove("CHIA_CLUSTER_FILE");
    if let Some(file) = cluster_file {
        command.env("CHIA_CLUSTER_FILE", file);
    }
    command.output().unwrap_or_else(|e| panic!("{} runs: {e}", binary.display()))
}

/// The `chia` binary beside xtask's (`cargo test --workspace` and cluster-local build it).
fn chia_binary() -> std::path::PathBuf {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("chia");
    assert!(binary.exists(), "{} is not built: cargo build -p chia-runtime --bin chia", binary.display());
    binary
}

/// Polls `chia` (at most [`BOUND`]) until `done` holds for its answer: the cluster's state
/// moves on events the test does not see (a dispatch, a heartbeat).
fn chia_until(
    cluster_file: &str,
    args: &[&str],
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let answer = chia_json(cluster_file, args);
        if done(&answer) {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chia {args:?} never showed what the test waits for:\n{answer:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn reasons(explanation: &serde_json::Value) -> Vec<String> {
    explanation["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|reason| {
            reason.as_object().map_or_else(|| reason.to_string(), |o| o.keys().next().unwrap().clone())
        })
        .collect()
}

#[test]
fn the_chia_command_shows_nodes_tasks_and_why_tasks_wait() {
    examples::link();
    let mut cluster = ClusterLocal::start(&[]);
    let line = cluster.wait_for_line("CHIA_CLUSTER_FILE=");
    let cluster_file = line.split("CHIA_CLUSTER_FILE=").nth(1).expect("a file").trim().to_string();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let cx = runtime.block_on(async {
        let credentials = chia::internals::tls::ClusterCredentials::load(std::path::Path::new(&cluster_file))
            .expect("credentials");
        let (client, _) =
            chia::internals::Client::connect(&credentials, "test-driver", None).await.expect("joins");
        chia::Context::from_client(client)
    });
    let _guard = runtime.enter();
    // Both workers' one `adder` is held by a long run; a third needs one too and waits for
    // room; a fourth needs a resource no node has; a fifth waits for the third's result.
    let long: Vec<_> = (0..2)
        .map(|i| {
            examples::run_until_cancelled::call(i, 600_000)
                .resource("adder", 1.0)
                .tag(format!("long{i}"))
                .remote(&cx)
        })
        .collect();
    let busy = examples::simulate::call(2, 10).resource("adder", 1.0).tag("busy").remote(&cx);
    let never = examples::simulate::call(3, 10).resource("gpu", 1.0).tag("never").remote(&cx);
    let waiting = examples::simulate::call(&busy, 10).tag("after-busy").remote(&cx);

    let status = chia_until(&cluster_file, &["status", "--json"], |s| s["tasks"]["running"] == 2);
    let nodes = status["nodes"].as_array().expect("nodes");
    let workers: Vec<&serde_json::Value> = nodes.iter().filter(|n| n["name"] != "head").collect();
    assert_eq!(workers.len(), 2, "{status:#}");
    for worker in &workers {
        assert_eq!(worker["total"]["adder"], 1.0, "{worker:#}");
        assert_eq!(worker["used"]["adder"], 1.0, "{worker:#}");
        assert!(worker["free"]["adder"].is_null(), "no adder is free: {worker:#}");
        assert!(worker["functions"].as_array().unwrap().iter().any(|f| f == "simulate"), "{worker:#}");
        assert_eq!(worker["running"], 1);
        assert!(worker["address"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{worker:#}");
    }
    assert_eq!(status["tasks"]["queued"], 2, "busy and never: {status:#}");
    assert_eq!(status["tasks"]["waiting"], 1, "{status:#}");
    assert_eq!(status["totals"]["submitted"], 5, "{status:#}");
    assert_eq!(status["jobs"], 1, "the test's driver (the chia command itself is left out): {status:#}");
    let demand = status["demand"].as_array().expect("demand");
    assert_eq!(demand.len(), 2, "{status:#}");
    let gpu = demand.iter().find(|d| d["request"]["gpu"] == 1.0).expect("the gpu shape");
    assert!(gpu["infeasible"].as_str().is_some_and(|r| r.contains("gpu")), "{gpu:#}");
    let adder = demand.iter().find(|d| d["request"]["adder"] == 1.0).expect("the adder shape");
    assert!(adder["infeasible"].is_null());
    assert!(status["stuck"].as_array().unwrap().is_empty(), "nothing fits, so nothing is stuck: {status:#}");

    let listed = chia_json(&cluster_file, &["list", "tasks", "--json"]);
    let tasks = listed["tasks"].as_array().expect("tasks");
    // JSON carries a task id as its number; the table prints `task-S.N`.
    let numbers: Vec<u64> = tasks.iter().map(|t| t["task"].as_u64().unwrap()).collect();
    let newest_first = [waiting.id(), never.id(), busy.id(), long[1].id(), long[0].id()].map(|id| id.0);
    assert_eq!(numbers, newest_first, "{listed:#}");
    let states: Vec<&str> = tasks.iter().map(|t| t["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["waiting", "queued", "queued", "running", "running"]);
    let running =
        chia_json(&cluster_file, &["list", "tasks", "--state", "running", "--tag", "long.*", "--json"]);
    assert_eq!(running["tasks"].as_array().unwrap().len(), 2, "{running:#}");
    let page = chia_json(&cluster_file, &["list", "tasks", "--limit", "2", "--json"]);
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    let after = page["next"].as_u64().expect("a next page").to_string();
    let rest = chia_json(&cluster_file, &["list", "tasks", "--after", &after, "--json"]);
    assert_eq!(rest["tasks"].as_array().unwrap().len(), 3, "{rest:#}");

    let busy_id = busy.id().to_string();
    let explained = chia_json(&cluster_file, &["explain", &busy_id, "--json"]);
    assert_eq!(reasons(&explained), ["busy", "busy"], "both workers are short of adder now: {explained:#}");
    assert_eq!(explained["reasons"][0]["busy"]["short"][0]["resource"], "adder");
    let explained = chia_json(&cluster_file, &["explain", &never.id().to_string(), "--json"]);
    assert_eq!(reasons(&explained), ["never_fits", "never_fits"], "{explained:#}");
    assert_eq!(explained["reasons"][0]["never_fits"]["short"][0]["resource"], "gpu");
    let explained = chia_json(&cluster_file, &["explain", &waiting.id().to_string(), "--json"]);
    assert_eq!(reasons(&explained), ["waiting_for"], "{explained:#}");
    assert_eq!(explained["reasons"][0]["waiting_for"]["tasks"][0], busy.id().0);
    // A function no worker offers fails at once; explain says how it ended and why.
    let unknown = not_on_any_worker::call().remote(&cx);
    let ended = runtime.block_on(unknown.get());
    assert!(ended.is_err());
    let explained = chia_json(&cluster_file, &["explain", &unknown.id().to_string(), "--json"]);
    let error = explained["reasons"][0]["ended"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("no node in the cluster has the function not_on_any_worker"), "{explained:#}");

    let shown = chia_json(&cluster_file, &["show", "task", &long[0].id().to_string(), "--json"]);
    assert_eq!(shown["function"], "run_until_cancelled");
    assert_eq!(shown["tag"], "long0");
    let attempts = shown["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{shown:#}");
    assert!(attempts[0]["node"].as_str().unwrap().starts_with("worker-"), "{shown:#}");
    assert!(attempts[0]["outcome"].is_null(), "still running: {shown:#}");
    let human = chia(Some(&cluster_file), &["status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("worker-1") && text.contains("run_until_cancelled") && text.contains("gpu"),
        "{text}"
    );

    // Cancelled by the command (another session than the owner): the long runs end, the
    // queued task runs, and its dependent after it.
    let cancelled = chia_json(&cluster_file, &["cancel", &long[0].id().to_string(), "--force", "--json"]);
    assert_eq!(cancelled["tasks"][0], long[0].id().0, "{cancelled:#}");
    let cancelled = runtime.block_on(long[0].get());
    assert!(matches!(cancelled, Err(chia::Error::Task(chia::TaskError::Cancelled { .. }))), "{cancelled:?}");
    assert_eq!(runtime.block_on(busy.get()).expect("busy runs once room is made"), 4);
    assert_eq!(runtime.block_on(waiting.get()).expect("and its dependent after it"), 16);
    let shown = chia_until(&cluster_file, &["show", "task", &long[0].id().to_string(), "--json"], |t| {
        t["state"] == "cancelled"
    });
    assert!(shown["attempts"][0]["outcome"].as_str().is_some_and(|o| o.contains("cancelled")), "{shown:#}");
    let driver_job = format!("driver-{}", long[0].id().session().0);
    let cancelled = chia_json(&cluster_file, &["cancel", "--job", &driver_job, "--json"]);
    let cancelled: Vec<u64> =
        cancelled["tasks"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert_eq!(cancelled, [long[1].id().0, never.id().0], "the job's unfinished tasks");
    drop(cx);
}

#[test]
fn the_chia_command_refuses_a_missing_or_wrong_cluster_file() {
    let home = tempfile::tempdir().expect("temp dir");
    let missing = home.path().join("nowhere.yaml");
    let output = chia(Some(missing.to_str().unwrap()), &["status"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("nowhere.yaml"), "the error names the file: {stderr}");
    let garbage = home.path().join("garbage.yaml");
    std::fs::write(&garbage, "address: 127.0.0.1:1\nca: not a certificate\n").unwrap();
    let output = chia(Some(garbage.to_str().unwrap()), &["status"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("garbage.yaml"), "the error names the file: {stderr}");
    let output = Command::new(chia_binary())
        .arg("status")
        .env_remove("CHIA_CLUSTER_FILE")
        .env_remove("CHIA_ADDRESS")
        .env("CHIA_STATE_DIR", home.path())
        .output()
        .expect("chia runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--cluster-file") && stderr.contains("CHIA_CLUSTER_FILE"), "{stderr}");
}

#[test]
fn chia_job_stop_ends_a_jobs_tasks_their_processes_and_its_services() {
    examples::link();
    let mut cluster = ClusterLocal::start(&[]);
    let line = cluster.wait_for_line("CHIA_CLUSTER_FILE=");
    let cluster_file = line.split("CHIA_CLUSTER_FILE=").nth(1).expect("a file").trim().to_string();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let _guard = runtime.enter();
    let credentials = chia::internals::tls::ClusterCredentials::load(std::path::Path::new(&cluster_file))
        .expect("credentials");
    let connect = |name: &'static str| {
        let credentials = credentials.clone();
        runtime.block_on(async move {
            let (client, _) =
                chia::internals::Client::connect(&credentials, name, None).await.expect("joins");
            chia::Context::from_client(client)
        })
    };
    let (job, bystander) = (connect("the-job"), connect("bystander"));
    let bounded = |what: &str, run: std::pin::Pin<Box<dyn std::future::Future<Output = _> + '_>>| {
        runtime
            .block_on(tokio::time::timeout(BOUND, run))
            .unwrap_or_else(|_| panic!("{what} took over {BOUND:?}"))
    };
    let tally = bounded(
        "starting job-tally",
        Box::pin(examples::TallyHandle::start(&job, chia::ServiceOptions::named("job-tally"), 0)),
    )
    .expect("the service starts");
    let kept = bounded(
        "starting kept-tally",
        Box::pin(examples::TallyHandle::start(&job, chia::ServiceOptions::named("kept-tally").detached(), 0)),
    )
    .expect("a detached service starts");
    assert_eq!(runtime.block_on(tally.add(2).get_timeout(BOUND)).unwrap(), 2);
    // A tool tree (with a setsid daemon and a plain child of the task's thread) that runs until
    // stopped, and a task queued behind the two long runs; the bystander's task is not the
    // job's. (Sync: a plain child of an async task is loose, and ends only when nothing else
    // runs on its worker — here the detached service may.)
    let dir = tempfile::tempdir().expect("a directory for the tools' pids");
    let tools = examples::tools::tool_tree_sync::call(dir.path().to_string_lossy().into_owned())
        .resource("adder", 1.0)
        .remote(&job);
    let long = examples::run_until_cancelled::call(1, 600_000).resource("adder", 1.0).remote(&job);
    let queued = examples::run_until_cancelled::call(2, 600_000).resource("adder", 1.0).remote(&job);
    let theirs = examples::simulate::call(3, 10).remote(&bystander);
    assert_eq!(runtime.block_on(theirs.get_timeout(BOUND)).unwrap(), 9);
    let pid_files = ["shell", "helper", "daemon"].map(|name| dir.path().join(name));
    chia_until(&cluster_file, &["list", "tasks", "--state", "running", "--json"], |page| {
        page["tasks"].as_array().is_some_and(|tasks| tasks.len() == 2) && pid_files.iter().all(|f| f.exists())
    });
    let pids: Vec<u32> =
        pid_files.iter().map(|f| std::fs::read_to_string(f).unwrap().trim().parse().unwrap()).collect();

    let job_name = format!("driver-{}", tools.id().session().0);
    let stopped = chia_json(&cluster_file, &["job", "stop", &job_name, "--force", "--json"]);
    let mut cancelled: Vec<u64> =
        stopped["tasks"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    cancelled.sort_unstable();
    assert_eq!(cancelled, [tools.id().0, long.id().0, queued.id().0], "{stopped:#}");
    assert_eq!(stopped["services"], serde_json::json!(["job-tally"]), "the detached one stays: {stopped:#}");
    for object in [&long, &queued] {
        let ended = runtime.block_on(object.get_timeout(BOUND));
        assert!(matches!(ended, Err(chia::Error::Task(chia::TaskError::Cancelled { .. }))), "{ended:?}");
    }
    assert!(runtime.block_on(tools.get_timeout(BOUND)).is_err());
    let services = chia_until(&cluster_file, &["list", "services", "--json"], |services| {
        services.as_array().is_some_and(|s| s.iter().all(|s| s["name"] != "job-tally"))
    });
    assert!(services.as_array().unwrap().iter().any(|s| s["name"] == "kept-tally"), "{services:#}");
    assert!(runtime.block_on(tally.add(1).get_timeout(BOUND)).is_err(), "the stopped service takes no call");
    assert_eq!(runtime.block_on(kept.add(5).get_timeout(BOUND)).unwrap(), 5);
    // The tool tree ended with its task, the daemon that left its session included.
    let deadline = std::time::Instant::now() + BOUND;
    // A zombie its worker has not reaped yet runs nothing.
    while pids.iter().any(|&pid| stat(pid).is_some_and(|(_, _, state)| state != 'Z')) {
        assert!(std::time::Instant::now() < deadline, "processes {pids:?} outlived their stopped job");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The driver stays connected and can go on.
    assert_eq!(
        runtime.block_on(examples::simulate::call(4, 10).remote(&job).get_timeout(BOUND)).unwrap(),
        16
    );
}

/// A function linked into this test only: no worker offers it.
#[chia::function]
fn not_on_any_worker() -> i64 {
    0
}
