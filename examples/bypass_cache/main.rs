//! Populate, then replay: the loop of CHIA's bypass_cache example.
//!
//! Four iterations of four `expensive_step` calls (about a second each), tagged
//! `iter<N>_call<M>`. The YAML next to this file caches every `iter.*` call and bypasses
//! `iter[13]_.*` calls, gated on a cache hit (`Bypass::replay_from_cache`):
//!
//! - first run (cold cache): all 16 calls run for real and their results are cached;
//! - later runs: iterations 1 and 3 are replayed from the cache (no `[REAL RUN]` lines, the
//!   iteration takes milliseconds) while 0 and 2 still run for real;
//! - `--flush-cache` empties the cache first, so the run is cold again.
//!
//! Runs on an embedded local cluster (4 workers), or on a real one when `CHIA_ADDRESS` /
//! `CHIA_CLUSTER_FILE` name it (e.g. `cargo xtask cluster-local`); the cache then lives on
//! that cluster's head.
//!
//! ```sh
//! cargo run --release -p examples --bin bypass_cache                  # cold, then run it again
//! cargo run --release -p examples --bin bypass_cache -- --flush-cache # cold again
//! ```
//!
//! `--help` lists the other options (`--config`, `--cache-dir`, `--iterations`, `--calls`).

use chia::bypass::Bypass;
use chia::cache::{CacheOptions, start_cache};
use clap::Parser;
use examples::expensive_step;
use std::path::PathBuf;
use std::time::Instant;

/// Populate-then-replay demo: run it twice (cold, then warm).
#[derive(Parser)]
struct Args {
    /// The YAML with the `cache:` and `bypass:` sections.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bypass_cache/bypass_cache.yaml"))]
    config: PathBuf,
    /// The cache directory, on the head node; it persists between runs. Default:
    /// `$XDG_CACHE_HOME/chia-rs/bypass-cache-demo`, else `~/.cache/chia-rs/bypass-cache-demo`.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Empty the cache before the loop, so every call runs for real.
    #[arg(long)]
    flush_cache: bool,
    /// Iterations of the loop.
    #[arg(long, default_value_t = 4)]
    iterations: u32,
    /// Calls of `expensive_step` per iteration.
    #[arg(long, default_value_t = 4)]
    calls: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chia::init_logging("warn");
    let args = Args::parse();
    let started = Instant::now();
    let cache_dir = match args.cache_dir {
        Some(dir) => dir,
        None => default_cache_dir()?,
    };
    let cx = chia::Init::new().local_workers(4).connect().await?;
    let cache =
        start_cache(&cx, CacheOptions::in_dir(&cache_dir).size(1.0, "GiB").yaml_path(&args.config)).await?;
    if args.flush_cache {
        cache.flush().await?;
        println!("cache flushed: this run starts cold");
    }
    println!("cache {} holds {} entries", cache_dir.display(), cache.keys().await?.len());

    let bypass = Bypass::load(&cx, Some(&args.config)).await?;
    bypass.replay_from_cache("expensive_step")?;

    let (mut real, mut replayed) = (0, 0);
    for iteration in 0..args.iterations {
        println!("\n== iteration {iteration} ==");
        let iteration_started = Instant::now();
        let mut calls = Vec::new();
        for call in 0..args.calls {
            let tag = format!("iter{iteration}_call{call}");
            let x = i64::from(iteration * args.calls + call);
            let (result, decision) =
                expensive_step::call(iteration, call, x).tag(&tag).remote_with_decision(&cx);
            println!("  {tag}: {decision}");
            if decision.is_bypassed() {
                replayed += 1;
            } else {
                real += 1;
            }
            calls.push((tag, x, result));
        }
        for (tag, x, result) in calls {
            let value = result.get().await?;
            anyhow::ensure!(value == x * x, "{tag}: expected {}, got {value}", x * x);
        }
        println!("iteration {iteration} took {:.2?}", iteration_started.elapsed());
    }
    println!(
        "\n{} calls: {real} ran for real, {replayed} replayed from the cache, in {:.2?}",
        real + replayed,
        started.elapsed()
    );
    cx.shutdown().await;
    Ok(())
}

/// A per-user place for the cache, not the machine's shared temporary directory, where other
/// users could read the results or plant a directory of their own under the expected name.
/// Found from this driver's environment; with `cargo xtask cluster-local` or the embedded
/// cluster the head runs on this machine as this user, on a remote head pass `--cache-dir`.
fn default_cache_dir() -> anyhow::Result<PathBuf> {
    // The XDG base directory rules: a relative value is invalid and ignored.
    let absolute =
        |variable: &str| std::env::var_os(variable).map(PathBuf::from).filter(|path| path.is_absolute());
    if let Some(cache_home) = absolute("XDG_CACHE_HOME") {
        return Ok(cache_home.join("chia-rs").join("bypass-cache-demo"));
    }
    if let Some(home) = absolute("HOME") {
        return Ok(home.join(".cache").join("chia-rs").join("bypass-cache-demo"));
    }
    anyhow::bail!(
        "no per-user cache directory: neither $XDG_CACHE_HOME nor $HOME is an absolute path; \
         pass --cache-dir DIR (a directory only you can read; not a shared one such as /tmp)"
    )
}
