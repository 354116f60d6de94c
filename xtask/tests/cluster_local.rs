//! Runs `cargo xtask cluster-local` for real: a head and two worker processes, with the
//! quickstart example run against them.

use std::process::Command;

#[test]
fn cluster_local_runs_a_command_against_real_processes() {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["cluster-local", "--workers", "2", "--resources", "adder=2,multiplier=1", "--", "quickstart"])
        .env_remove("CHIA_ADDRESS")
        .env_remove("CHIA_CLUSTER_FILE")
        .output()
        .expect("xtask runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "xtask failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    // The quickstart connected to the xtask's cluster, not an embedded one.
    assert!(stdout.contains("ran on worker-1") && stdout.contains("ran on worker-2"), "{stdout}");
    assert!(stdout.contains("sum_of_squares(5)     =  55"), "{stdout}");
    assert!(stdout.contains("simple_multiply(.,10) =  30"), "{stdout}");
    // Each process's log is prefixed and the cluster was torn down.
    assert!(stderr.contains("[head] ") && stderr.contains("[worker-1] "), "{stderr}");
    assert!(stderr.contains("stopping the cluster"), "{stderr}");
}

#[test]
fn cluster_local_reports_a_bad_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("cluster.yaml");
    std::fs::write(&config, "workers:\n  - count: 2\n    resourcez: {adder: 1}\n").expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["cluster-local", "--config"])
        .arg(&config)
        .args(["--", "true"])
        .output()
        .expect("xtask runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cluster.yaml") && stderr.contains("resourcez"), "{stderr}");
}
