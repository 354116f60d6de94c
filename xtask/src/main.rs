//! `cargo xtask`: project tasks that need more than cargo.
//!
//! `cargo xtask cluster-local` builds `chia-head` and a worker binary, starts a head and N
//! workers as separate processes on this machine (authenticated QUIC over loopback), prints
//! how to connect, streams every process's log with a prefix, and on Ctrl-C, SIGTERM or SIGHUP
//! stops them all and removes its temporary state directory (the cluster's credentials).
//! With `-- COMMAND ...` it runs the command against the cluster instead, tears the cluster
//! down and exits with the command's status.
//!
//! `cargo xtask bench` builds `chia-head` and `chia-bench` in release mode and prints the
//! benchmark's figures (`--json`, `--only`, `--scale` are passed through).
//!
//! `cargo xtask simulate` runs seeds of the deterministic cluster simulator around the real
//! head core (in a release build) and prints decisions/s, steps/s and the largest queue;
//! `--seed S` with the flags a failure printed replays it.
//!
//! `cargo xtask` is an alias (`.cargo/config.toml`) for `cargo run --quiet --package xtask --`;
//! `cargo xtask TASK --help` lists a task's options.

mod bench;
mod cluster_local;
mod simulate;

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
    /// Build in release mode and print the benchmark figures (see `chia-bench --help`).
    Bench(bench::Args),
    /// Run seeds of the deterministic simulator around the head core (a release build).
    Simulate(simulate::Args),
}

/// Where cargo puts this workspace's binaries (`CARGO_TARGET_DIR`, else `<workspace>/target`).
fn target_dir() -> std::path::PathBuf {
    let workspace =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace");
    std::env::var_os("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|| workspace.join("target"))
}

fn main() -> ExitCode {
    match Cli::parse().task {
        Task::ClusterLocal(args) => chia::run_main(cluster_local::run(args)),
        Task::Bench(args) => chia::run_main(bench::run(args)),
        // No async runtime: the simulator is a plain loop on the caller's threads.
        Task::Simulate(args) => simulate::run(args),
    }
}
