//! `cargo xtask cluster-local`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
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

pub async fn run(args: Args) -> Result<ExitCode, String> {
    let plan = plan_workers(&args)?;
    let bin_dir = build(&args).await?;
    let state_dir = tempfile::Builder::new().prefix("chia-cluster-").tempdir().map_err(|e| e.to_string())?;
    let (logs, log_rx) = mpsc::unbounded_channel::<String>();
    let printer = tokio::spawn(print_logs(log_rx));
    let mut children: Vec<Child> = Vec::new();
    let result = start_and_run(&args, &plan, &bin_dir, state_dir.path(), &logs, &mut children).await;
    for child in &mut children {
        stop(child).await;
    }
    drop(logs);
    let _ = printer.await;
    result
}

fn plan_workers(args: &Args) -> Result<Vec<WorkerPlan>, String> {
    let Some(path) = &args.config else {
        return Ok((1..=args.workers)
            .map(|i| WorkerPlan { name: format!("worker-{i}"), resources: args.resources.clone() })
            .collect());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config: ClusterConfig =
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
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
async fn build(args: &Args) -> Result<PathBuf, String> {
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
    let status = command.status().await.map_err(|e| format!("cannot run {cargo}: {e}"))?;
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
    children: &mut Vec<Child>,
) -> Result<ExitCode, String> {
    let mut head = Command::new(bin_dir.join("chia-head"));
    head.args(["--listen", "127.0.0.1:0", "--state-dir"]).arg(state_dir);
    let ready = spawn_logged(head, "head", logs, children)?;
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
        pending.push((worker.name.clone(), spawn_logged(command, &worker.name, logs, children)?));
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
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("xtask: stopping the cluster");
        return Ok(ExitCode::SUCCESS);
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
    let mut child = command.spawn().map_err(|e| format!("cannot run {:?}: {e}", args.command[0]))?;
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| e.to_string())?,
        _ = tokio::signal::ctrl_c() => {
            stop(&mut child).await;
            return Ok(ExitCode::from(130));
        }
    };
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
    children: &mut Vec<Child>,
) -> Result<mpsc::UnboundedReceiver<String>, String> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
    let (lines, line_rx) = mpsc::unbounded_channel();
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward(stdout, format!("[{name}] "), logs.clone(), Some(lines)));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward(stderr, format!("[{name}] "), logs.clone(), None));
    }
    children.push(child);
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

/// Asks a process to stop (SIGTERM), then kills it if it has not exited in a few seconds.
async fn stop(child: &mut Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // `kill` runs as a command so xtask needs no libc binding for one signal.
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}
