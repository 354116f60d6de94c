//! The command line of a worker binary. A user's worker is one line:
//! `fn main() -> std::process::ExitCode { chia::worker_main() }`, linked with the crates that
//! define the user's functions.

use crate::driver::contain;
use crate::env::{self, default_state_dir};
use crate::net::tls::ClusterCredentials;
use crate::worker::{Backoff, NodeOffer, Worker, stay_joined, with_default_cpus};
use chia_core::Resources;
use chia_core::placement::Labels;
use clap::Parser;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// Joins a chia cluster and runs the remote functions linked into this binary.
#[derive(Parser, Debug)]
#[command(version)]
struct WorkerArgs {
    /// The cluster file written by chia-head (default: <state dir>/cluster.yaml).
    #[arg(long, env = env::CLUSTER_FILE)]
    cluster_file: Option<PathBuf>,
    /// The head's address, host:port (default: the one in the cluster file).
    #[arg(long, env = env::ADDRESS)]
    address: Option<String>,
    /// Resources this node offers, e.g. `adder=4,cpu=2` (CPU defaults to the core count).
    #[arg(long, default_value = "")]
    resources: String,
    /// A YAML file with a `resources:` map (e.g. `resources: {adder: 4, fpga: 0.5}`), merged
    /// under --resources.
    #[arg(long)]
    resources_file: Option<PathBuf>,
    /// Labels calls can ask for with `.label(key, value)`, e.g. `rack=a,fpga=vu9p` (keys and
    /// values: ASCII letters, digits, `-_./`, at most 63 characters).
    #[arg(long, default_value = "")]
    labels: String,
    /// The node name (default: <hostname>-<pid>); the head adds a suffix if it is taken.
    #[arg(long)]
    name: Option<String>,
    /// Exit when the connection to the head is lost, instead of joining again (with backoff)
    /// once a head is back on the same address.
    #[arg(long)]
    exit_on_head_loss: bool,
}

/// Sets up logging to stderr from `RUST_LOG`, or `default_filter` (e.g. `"info"`, `"warn"`)
/// when it is not set. Does nothing if a logger is already installed.
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only on a terminal: logs piped to files or prefixed by `cargo xtask` stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// Runs a worker from the command line until Ctrl-C or SIGTERM; a lost head is joined again
/// when it is back (`--exit-on-head-loss` exits instead).
pub fn worker_main() -> ExitCode {
    let args = WorkerArgs::parse();
    init_logging("info");
    // Before the tokio runtime: the sentinel is forked while this process has one thread.
    if let Err(error) = contain::contain_worker() {
        eprintln!("error: cannot contain the processes of tasks: {error}");
        return ExitCode::FAILURE;
    }
    run_main(run(args))
}

/// Runs a binary's async `main` on a multi-threaded tokio runtime; an error is printed as
/// `error: ...` and ends the process with a failing status.
pub fn run_main(main: impl Future<Output = Result<ExitCode, String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(main).unwrap_or_else(|message| {
        eprintln!("error: {message}");
        ExitCode::FAILURE
    })
}

async fn run(args: WorkerArgs) -> Result<ExitCode, String> {
    let resources = offered_resources(&args)?;
    let labels = Labels::parse(&args.labels).map_err(|e| format!("--labels {:?}: {e}", args.labels))?;
    let file = args.cluster_file.unwrap_or_else(|| default_state_dir().join("cluster.yaml"));
    let mut credentials = ClusterCredentials::load(&file).map_err(|e| e.to_string())?;
    if let Some(address) = args.address {
        credentials.address = address;
    }
    let name = args.name.unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let ready = |worker: &Worker| {
        println!(
            "chia-worker ready node={} head={} resources={resources} labels={labels} containment={}",
            worker.node_name(),
            credentials.address,
            contain::mechanism().map_or("none".to_string(), |m| m.to_string())
        );
    };
    if !args.exit_on_head_loss {
        let until = async {
            if let Err(e) = shutdown_signal().await {
                tracing::error!("cannot wait for a shutdown signal: {e}");
                std::future::pending::<()>().await;
            }
        };
        let offer = NodeOffer { resources: resources.clone(), labels: labels.clone() };
        return match stay_joined(&credentials, &name, offer, Backoff::default(), ready, until).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(replaced) => Err(replaced.to_string()),
        };
    }
    let offer = NodeOffer { resources: resources.clone(), labels: labels.clone() };
    let worker = Worker::connect(&credentials, &name, offer).await.map_err(|e| e.to_string())?;
    ready(&worker);
    tokio::select! {
        _ = worker.stopped() => {
            tracing::error!("lost the connection to the head at {}", credentials.address);
            Ok(ExitCode::FAILURE)
        }
        result = shutdown_signal() => {
            result.map_err(|e| format!("cannot wait for a shutdown signal: {e}"))?;
            worker.leave().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Ctrl-C or SIGTERM (what `kill`, systemd and `cargo xtask cluster-local` send).
async fn shutdown_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}

fn offered_resources(args: &WorkerArgs) -> Result<Resources, String> {
    let mut resources = Resources::new();
    if let Some(path) = &args.resources_file {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ResourcesFile {
            resources: BTreeMap<String, f64>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let origin = path.display().to_string();
        // Rendered with the file's name: the parser's default snippet header says `<input>`.
        let file: ResourcesFile = serde_saphyr::from_str(&text).map_err(|e| {
            e.render_with_options(serde_saphyr::render_options! { source_name: Some(origin.as_str()) })
        })?;
        for (name, amount) in file.resources {
            let amount = chia_core::ResourceAmount::from_f64(amount)
                .map_err(|e| format!("{}: resource {name}: {e}", path.display()))?;
            resources.set(&name, amount).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let flags =
        Resources::parse(&args.resources).map_err(|e| format!("--resources {:?}: {e}", args.resources))?;
    for (name, amount) in flags.iter() {
        resources.set(name, amount).map_err(|e| e.to_string())?;
    }
    Ok(with_default_cpus(resources))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resources_file_parse_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-resources.yaml");
        std::fs::write(&path, "resources: {adder: 4\n").unwrap();
        let args = WorkerArgs::parse_from(["worker", "--resources-file", path.to_str().unwrap()]);
        let error = offered_resources(&args).unwrap_err();
        assert!(error.contains("node-resources.yaml"), "{error}");
        assert!(!error.contains("<input>"), "{error}");
    }
}
