//! The bypass_cache example, run as its users run it: cold, warm, then flushed.

use std::process::Command;

/// Runs the example against `cache_dir` on its own embedded cluster and returns its output.
fn run(cache_dir: &std::path::Path, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_bypass_cache"))
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(extra)
        // An embedded cluster, whatever the environment of the test run says.
        .env_remove("CHIA_ADDRESS")
        .env_remove("CHIA_CLUSTER_FILE")
        .env_remove("CHIA_LOCAL_WORKERS")
        .env_remove("CHIA_LOCAL_RESOURCES")
        .output()
        .expect("the example starts");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn real_runs(stdout: &str) -> Vec<&str> {
    let mut runs: Vec<&str> = stdout.lines().filter(|line| line.starts_with("[REAL RUN]")).collect();
    runs.sort_unstable();
    runs
}

#[test]
fn a_cold_run_populates_the_cache_and_a_warm_run_replays_iterations_1_and_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache_dir = dir.path().join("cache");

    let cold = run(&cache_dir, &[]);
    assert_eq!(real_runs(&cold).len(), 16, "{cold}");
    assert!(cold.contains("16 calls: 16 ran for real, 0 replayed"), "{cold}");

    let warm = run(&cache_dir, &[]);
    let runs = real_runs(&warm);
    assert_eq!(runs.len(), 8, "{warm}");
    assert!(runs.iter().all(|line| line.contains("iter0") || line.contains("iter2")), "{warm}");
    assert!(warm.contains("iter1_call2: bypassed by chia.cache_replay"), "{warm}");
    assert!(warm.contains("iter0_call2: runs (tag does not match the bypass tags)"), "{warm}");
    assert!(warm.contains("16 calls: 8 ran for real, 8 replayed"), "{warm}");

    let flushed = run(&cache_dir, &["--flush-cache"]);
    assert_eq!(real_runs(&flushed).len(), 16, "{flushed}");
    assert!(flushed.contains("iter1_call0: runs (condition chia.cache_hit returned false)"), "{flushed}");
}
