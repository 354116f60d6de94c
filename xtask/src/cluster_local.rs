//! `cargo xtask cluster-local`.
//!
//! Whatever ends it — the command exiting, an error, or SIGINT, SIGTERM or SIGHUP at any point
//! (the build included) — it stops every process it started and removes its temporary state
//! directory, which holds the cluster's credentials. The signals are taken over before anything
//! starts: their default action would end xtask at once and leave both behind. Each process it
//! starts leads a process group of its own, and the stop goes to the whole group, so what
//! those processes started themselves ends too (unless it left the group, e.g. by `setsid`).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of workers (ignored when --config lists workers).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Resources of each worker, e.g. `demo=1,adder=2` (CPU defaults to the core count).
    #[arg(long, default_value = "")]
    resources: String,
    /// A cluster YAML: `workers: [{name: big, count: 2, resources: {adder: 4, CPU: 2}}]`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The worker binary of the `examples` package to run (it must link your functions).
    #[arg(long, default_value = "worker")]
    worker_bin: String,
    /// Build and run in release mode.
    #[arg(long)]
    release: bool,
    /// The command to run against the cluster (its binaries' directory is put first on PATH,
    /// so `-- quickstart` works). Without it, the cluster runs until Ctrl-C.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ClusterConfig {
    workers: Vec<WorkerGroup>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct WorkerGroup {
    name: Option<String>,
    #[serde(default = "one")]
    count: usize,
    #[serde(default)]
    resources: BTreeMap<String, f64>,
}

fn one() -> usize {
    1
}

struct WorkerPlan {
    name: String,
    resources: String,
}

/// How long to wait for a process to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the processes have to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long to wait, once every process has exited, for the last of their log lines: a
/// grandchild that inherited a pipe may keep it open forever.
const LOG_DRAIN: Duration = Duration::from_secs(2);

pub async fn run(args: Args) -> Result<ExitCode, String> {
    let mut signals = StopSignals::install().map_err(|e| format!("cannot handle stop signals: {e}"))?;
    let plan = plan_workers(&args)?;
    // It holds the cluster's credentials: readable by its owner only, from the start.
    let state_dir = tempfile::Builder::new()
        .prefix("chia-cluster-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(|e| e.to_string())?;
    let (logs, log_rx) = mpsc::unbounded_channel::<String>();
    let printer = tokio::spawn(print_logs(log_rx));
    let mut processes = Processes::default();
    // On a signal the session is dropped where it stands (building, starting or running) and
    // everything it started is in `processes`.
    let result = tokio::select! {
        result = session(&args, &plan, state_dir.path(), &logs, &mut processes) => result,
        stop = signals.recv() => {
            eprintln!("xtask: {}: stopping the cluster", stop.name);
            Ok(ExitCode::from(stop.exit_status))
        }
    };
    processes.stop_all(&mut signals).await;
    drop(logs);
    let _ = tokio::time::timeout(LOG_DRAIN, printer).await;
    let state_path = state_dir.path().to_path_buf();
    if let Err(e) = state_dir.close() {
        eprintln!("xtask: cannot remove the cluster's state directory {}: {e}", state_path.display());
    }
    result
}

/// Builds the binaries, starts the cluster, and runs the command or waits for a signal.
async fn session(
    args: &Args,
    plan: &[WorkerPlan],
    state_dir: &Path,
    logs: &mpsc::UnboundedSender<String>,
    processes: &mut Processes,
) -> Result<ExitCode, String> {
    let bin_dir = build(args, processes).await?;
    start_and_run(args, plan, &bin_dir, state_dir, logs, processes).await
}

/// SIGINT, SIGTERM and SIGHUP, taken over from their default action (ending xtask at once).
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

/// A stop signal that arrived, and the exit status a shell expects after it (128 + number).
struct StopSignal {
    name: &'static str,
    exit_status: u8,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next stop signal.
    async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.interrupt.recv() => StopSignal { name: "SIGINT", exit_status: 130 },
            _ = self.terminate.recv() => StopSignal { name: "SIGTERM", exit_status: 143 },
            _ = self.hangup.recv() => StopSignal { name: "SIGHUP", exit_status: 129 },
        }
    }
}

/// Every process xtask started whose process group may still hold something, oldest first.
#[derive(Default)]
struct Processes {
    running: Vec<Started>,
}

/// A process xtask started, leading a process group of its own: what it starts (a worker's
/// tools, a command's background jobs, cargo's rustc) is in that group unless it moved itself
/// out, so stopping the group stops them too.
struct Started {
    child: Child,
    /// The group's id: the child's pid, kept after tokio reaped the child (and forgot its id).
    group: libc::pid_t,
}

/// How often a group is looked at while waiting for it to empty: its members are not xtask's
/// children, so nothing tells when they exit.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// How long to wait for the members of a group to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Sends `signal` to every process of `group`.
///
/// Only called for a group whose leader xtask has not reaped yet, or reaped a moment ago: while
/// the leader or any member exists the id cannot name another group (Linux does not reuse a pid
/// that is some group's id), and pids are handed out in turn, so one just freed is not taken
/// again at once. Groups are therefore never kept once their leader ended and they emptied.
fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    let _ = killpg(group, signal);
}

/// Whether `group` still has a process (a zombie member counts until its parent reaps it).
fn group_exists(group: libc::pid_t) -> bool {
    // Signal 0 only checks that the group exists.
    killpg(group, 0)
}

/// killpg(2); true if the signal was sent (for 0: if the group exists).
#[allow(unsafe_code)]
fn killpg(group: libc::pid_t, signal: libc::c_int) -> bool {
    // SAFETY: killpg takes plain integers and touches no memory of ours.
    unsafe { libc::killpg(group, signal) == 0 }
}

/// Resolves once `group` is empty.
async fn group_emptied(group: libc::pid_t) {
    while group_exists(group) {
        tokio::time::sleep(GROUP_POLL).await;
    }
}

impl Processes {
    /// Starts `command` in a process group of its own and keeps it until it and its group
    /// have ended. `kill_on_drop` is a last resort (a panic): the normal end is
    /// [`Processes::wait_newest`] or [`Processes::stop_all`].
    ///
    /// Its own group also keeps a terminal's Ctrl-C from reaching the cluster directly: only
    /// xtask gets it and stops everything in order. (So a command cannot read the terminal —
    /// it is not the foreground job; give it input through a pipe or a file.)
    fn spawn(&mut self, mut command: Command, name: &str) -> Result<&mut Child, String> {
        command.kill_on_drop(true).process_group(0);
        let child = command.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        let group = child
            .id()
            .and_then(|pid| libc::pid_t::try_from(pid).ok())
            .ok_or_else(|| format!("{name} exited before its process group was known"))?;
        self.running.push(Started { child, group });
        Ok(&mut self.running.last_mut().expect("just pushed").child)
    }

    /// Waits for the newest process to exit, ends what it left running in its group (SIGTERM,
    /// SIGKILL after [`STOP_GRACE`]), and forgets it.
    async fn wait_newest(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let newest = self.running.last_mut().expect("a process was started");
        let status = newest.child.wait().await;
        let group = newest.group;
        // Kept in `running` until its group is empty, so a stop signal meanwhile (which drops
        // this future) leaves the group to `stop_all`.
        if group_exists(group) {
            signal_group(group, libc::SIGTERM);
            if tokio::time::timeout(STOP_GRACE, group_emptied(group)).await.is_err() {
                signal_group(group, libc::SIGKILL);
                let _ = tokio::time::timeout(KILL_WAIT, group_emptied(group)).await;
            }
        }
        self.running.pop();
        status
    }

    /// Asks every process group to stop (SIGTERM, all at once, newest first: the command, then
    /// the workers, then the head) and kills the groups still holding a process after
    /// [`STOP_GRACE`], or at once if another stop signal arrives meanwhile. Returns when every
    /// process xtask started has exited and its group is empty (or, after SIGKILL, once
    /// [`KILL_WAIT`] has passed: a member reparented to an init that does not reap stays a
    /// zombie).
    async fn stop_all(&mut self, signals: &mut StopSignals) {
        for started in self.running.iter().rev() {
            signal_group(started.group, libc::SIGTERM);
        }
        let all_ended = async {
            for started in self.running.iter_mut().rev() {
                let _ = started.child.wait().await;
            }
            for started in self.running.iter().rev() {
                group_emptied(started.group).await;
            }
        };
        let kill_the_rest = tokio::select! {
            () = all_ended => false,
            () = tokio::time::sleep(STOP_GRACE) => {
                eprintln!("xtask: processes still running {STOP_GRACE:?} after SIGTERM; killing them");
                true
            }
            stop = signals.recv() => {
                eprintln!("xtask: {} again: killing the processes", stop.name);
                true
            }
        };
        if kill_the_rest {
            for started in &mut self.running {
                signal_group(started.group, libc::SIGKILL);
                // The leader too, should it have left its group; then wait for it.
                let _ = started.child.kill().await;
            }
            let emptied = async {
                for started in &self.running {
                    group_emptied(started.group).await;
                }
            };
            let _ = tokio::time::timeout(KILL_WAIT, emptied).await;
        }
        self.running.clear();
    }
}

fn plan_workers(args: &Args) -> Result<Vec<WorkerPlan>, String> {
    let Some(path) = &args.config else {
        return Ok((1..=args.workers)
            .map(|i| WorkerPlan { name: format!("worker-{i}"), resources: args.resources.clone() })
            .collect());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.display().to_string();
    // Rendered with the file's name: the default snippet header says `<input>`.
    let config: ClusterConfig = serde_saphyr::from_str(&text).map_err(|e| {
        e.render_with_options(serde_saphyr::render_options! { source_name: Some(name.as_str()) })
    })?;
    let mut plan = Vec::new();
    for (group_index, group) in config.workers.iter().enumerate() {
        let resources = group.resources.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let base = group.name.clone().unwrap_or_else(|| format!("group{}", group_index + 1));
        for i in 1..=group.count {
            let name = if group.count == 1 { base.clone() } else { format!("{base}-{i}") };
            plan.push(WorkerPlan { name, resources: resources.clone() });
        }
    }
    if plan.is_empty() {
        return Err(format!("{}: lists no workers", path.display()));
    }
    Ok(plan)
}

/// Builds the head and the examples' binaries; returns the directory they are in.
async fn build(args: &Args, processes: &mut Processes) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    command.args([
        "build",
        "--quiet",
        "-p",
        "chia-runtime",
        "--bin",
        "chia-head",
        "--bin",
        "chia",
        "-p",
        "examples",
        "--bins",
    ]);
    if args.release {
        command.arg("--release");
    }
    // Through `processes`, so that a signal during the build stops cargo too.
    processes.spawn(command, &cargo)?;
    let status = processes.wait_newest().await.map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err("cargo build failed".into());
    }
    Ok(crate::target_dir().join(if args.release { "release" } else { "debug" }))
}

async fn start_and_run(
    args: &Args,
    plan: &[WorkerPlan],
    bin_dir: &Path,
    state_dir: &Path,
    logs: &mpsc::UnboundedSender<String>,
    processes: &mut Processes,
) -> Result<ExitCode, String> {
    let mut head = Command::new(bin_dir.join("chia-head"));
    head.args(["--listen", "127.0.0.1:0", "--state-dir"]).arg(state_dir);
    let ready = spawn_logged(head, "head", logs, processes)?;
    let head_line = wait_ready(ready, "head", "chia-head ready").await?;
    let address = field(&head_line, "address").ok_or("the head printed no address")?;
    let cluster_file = field(&head_line, "cluster_file").ok_or("the head printed no cluster file")?;

    let mut pending = Vec::new();
    for worker in plan {
        let mut command = Command::new(bin_dir.join(&args.worker_bin));
        command.args([
            "--cluster-file",
            &cluster_file,
            "--name",
            &worker.name,
            "--resources",
            &worker.resources,
        ]);
        pending.push((worker.name.clone(), spawn_logged(command, &worker.name, logs, processes)?));
    }
    for (name, ready) in pending {
        wait_ready(ready, &name, "chia-worker ready").await?;
    }
    eprintln!(
        "xtask: cluster up: head at {address}, {} worker(s). Connect with:\n  export CHIA_ADDRESS={address} CHIA_CLUSTER_FILE={cluster_file}",
        plan.len()
    );

    if args.command.is_empty() {
        eprintln!("xtask: press Ctrl-C to stop the cluster");
        // Until a stop signal, which ends this future from `run`.
        return std::future::pending().await;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(bin_dir.to_path_buf()).chain(std::env::split_paths(&path)))
            .map_err(|e| e.to_string())?;
    let mut command = Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("CHIA_ADDRESS", &address)
        .env("CHIA_CLUSTER_FILE", &cluster_file)
        .env("PATH", path);
    let child = processes.spawn(command, &format!("{:?}", args.command[0]))?;
    eprintln!("xtask: running {:?} (pid {})", args.command, child.id().unwrap_or_default());
    let status = processes.wait_newest().await.map_err(|e| e.to_string())?;
    eprintln!("xtask: {:?} exited with {status}; stopping the cluster", args.command[0]);
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Starts `command` with its output prefixed into `logs`; returns a channel that receives
/// each stdout line (to watch for the ready line).
fn spawn_logged(
    mut command: Command,
    name: &str,
    logs: &mpsc::UnboundedSender<String>,
    processes: &mut Processes,
) -> Result<mpsc::UnboundedReceiver<String>, String> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = processes.spawn(command, name)?;
    let (lines, line_rx) = mpsc::unbounded_channel();
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward(stdout, format!("[{name}] "), logs.clone(), Some(lines)));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward(stderr, format!("[{name}] "), logs.clone(), None));
    }
    Ok(line_rx)
}

async fn forward(
    stream: impl AsyncRead + Unpin,
    prefix: String,
    logs: mpsc::UnboundedSender<String>,
    lines: Option<mpsc::UnboundedSender<String>>,
) {
    let mut reader = BufReader::new(stream).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        if let Some(lines) = &lines {
            let _ = lines.send(line.clone());
        }
        let _ = logs.send(format!("{prefix}{line}"));
    }
}

async fn print_logs(mut logs: mpsc::UnboundedReceiver<String>) {
    while let Some(line) = logs.recv().await {
        eprintln!("{line}");
    }
}

async fn wait_ready(
    mut lines: mpsc::UnboundedReceiver<String>,
    name: &str,
    marker: &str,
) -> Result<String, String> {
    let wait = async {
        while let Some(line) = lines.recv().await {
            if line.starts_with(marker) {
                return Ok(line);
            }
        }
        Err(format!("{name} exited before it was ready (see its log above)"))
    };
    tokio::time::timeout(READY_TIMEOUT, wait)
        .await
        .map_err(|_| format!("{name} was not ready within {READY_TIMEOUT:?}"))?
}

fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace().find_map(|part| part.strip_prefix(key)?.strip_prefix('=')).map(str::to_string)
}
