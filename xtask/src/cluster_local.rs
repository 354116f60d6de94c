//! `cargo xtask cluster-local`.
//!
//! Whatever ends it — the command exiting, an error, or SIGINT, SIGTERM or SIGHUP at any point
//! (the build included) — it stops every process it started and removes its temporary state
//! directory, which holds the cluster's credentials. The signals are taken over before anything
//! starts: their default action would end xtask at once and leave both behind.

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
    let state_dir = tempfile::Builder::new().prefix("chia-cluster-").tempdir().map_err(|e| e.to_string())?;
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

/// Every process xtask started that may still be running, oldest first.
#[derive(Default)]
struct Processes {
    running: Vec<Child>,
}

impl Processes {
    /// Starts `command` and keeps it until it is known to have exited. `kill_on_drop` is a last
    /// resort (a panic): the normal end is [`Processes::stop_all`].
    fn spawn(&mut self, mut command: Command, name: &str) -> Result<&mut Child, String> {
        command.kill_on_drop(true);
        let child = command.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
        self.running.push(child);
        Ok(self.running.last_mut().expect("just pushed"))
    }

    /// Waits for the newest process to exit and forgets it.
    async fn wait_newest(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let child = self.running.last_mut().expect("a process was started");
        let status = child.wait().await;
        self.running.pop();
        status
    }

    /// Asks every process to stop (SIGTERM, all at once, newest first: the command, then the
    /// workers, then the head) and kills those still running after [`STOP_GRACE`], or at once
    /// if another stop signal arrives meanwhile. Returns when all have exited.
    async fn stop_all(&mut self, signals: &mut StopSignals) {
        for child in self.running.iter().rev() {
            if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
                // SAFETY: kill(2) takes plain integers; `pid` is a child not yet reaped (tokio
                // clears its id once it has waited for it), so it names no other process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let all_exited = async {
            for child in self.running.iter_mut().rev() {
                let _ = child.wait().await;
            }
        };
        let kill_the_rest = tokio::select! {
            () = all_exited => false,
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
            for child in &mut self.running {
                // SIGKILL, then wait for it.
                let _ = child.kill().await;
            }
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
