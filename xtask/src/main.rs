//! `cargo xtask`: project tasks that need more than cargo.
//!
//! `cargo xtask cluster-local` builds `chia-head` and a worker binary, starts a head and N
//! workers as separate processes on this machine (authenticated QUIC over loopback), prints
//! how to connect, streams every process's log with a prefix, and stops them all on Ctrl-C.
//! With `-- COMMAND ...` it runs the command against the cluster instead, tears the cluster
//! down and exits with the command's status.

mod cluster_local;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "chia-rs project tasks", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Start a head and workers as local processes (and optionally run a command against them).
    ClusterLocal(cluster_local::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("xtask: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.task {
        Task::ClusterLocal(args) => runtime.block_on(cluster_local::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}
