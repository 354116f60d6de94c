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

/// Runs the example without `--cache-dir`, one short iteration, with `environment` set (and
/// the cache variables not in it removed).
fn run_with_default_dir(environment: &[(&str, &std::path::Path)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bypass_cache"));
    command
        .args(["--iterations", "1", "--calls", "1"])
        .env_remove("CHIA_ADDRESS")
        .env_remove("CHIA_CLUSTER_FILE")
        .env_remove("CHIA_LOCAL_WORKERS")
        .env_remove("CHIA_LOCAL_RESOURCES")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("HOME");
    for (name, value) in environment {
        command.env(name, value);
    }
    command.output().expect("the example starts")
}

#[test]
fn the_default_cache_directory_is_per_user_and_private_not_in_tmp() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path).expect("the cache exists").permissions().mode() & 0o777
    };

    let xdg = dir.path().join("xdg");
    let output = run_with_default_dir(&[("XDG_CACHE_HOME", &xdg), ("HOME", &dir.path().join("home"))]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let expected = xdg.join("chia-rs/bypass-cache-demo");
    assert!(stdout.contains(&format!("cache {} holds 0 entries", expected.display())), "{stdout}");
    assert_eq!(mode(&expected), 0o700);
    assert!(!dir.path().join("home").exists(), "$XDG_CACHE_HOME comes first");

    let home = dir.path().join("home");
    let output = run_with_default_dir(&[("HOME", &home)]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let expected = home.join(".cache/chia-rs/bypass-cache-demo");
    assert!(stdout.contains(&format!("cache {} holds 0 entries", expected.display())), "{stdout}");
    assert_eq!(mode(&expected), 0o700);

    // Neither: a clear error naming the way out, rather than a shared directory.
    let output = run_with_default_dir(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no per-user cache directory") && stderr.contains("--cache-dir"), "{stderr}");
}
