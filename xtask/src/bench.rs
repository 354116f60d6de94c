//! `cargo xtask bench`: builds the release binaries and runs `chia-bench`.

use std::process::ExitCode;
use tokio::process::Command;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON instead of `name value unit` lines.
    #[arg(long)]
    json: bool,
    /// Only figures whose names start with one of these (comma-separated).
    #[arg(long)]
    only: Option<String>,
    /// Multiply every count by this (e.g. 0.1 for a quick run).
    #[arg(long)]
    scale: Option<f64>,
    /// Serve the embedded heads' metrics and scrape them every second while measuring.
    #[arg(long)]
    metrics: bool,
}

pub async fn run(args: Args) -> Result<ExitCode, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "--release", "-p", "chia-runtime", "--bin", "chia-head"])
        .args(["-p", "xtask", "--bin", "chia-bench"])
        .status()
        .await
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err("cargo build --release failed".into());
    }
    let bin_dir = crate::target_dir().join("release");
    let mut bench = Command::new(bin_dir.join("chia-bench"));
    bench.arg("--head-bin").arg(bin_dir.join("chia-head"));
    if args.json {
        bench.arg("--json");
    }
    if let Some(only) = &args.only {
        bench.args(["--only", only]);
    }
    if let Some(scale) = args.scale {
        bench.args(["--scale", &scale.to_string()]);
    }
    if args.metrics {
        bench.arg("--metrics");
    }
    let status = bench.status().await.map_err(|e| format!("cannot run chia-bench: {e}"))?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
