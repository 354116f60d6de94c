//! Helpers shared by the end-to-end tests.

// Each test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

use chia_runtime::{Context, LocalCluster, Resources};
use std::time::Duration;

/// Bounds a test that would otherwise hang; never used to wait for something to happen.
pub const BOUND: Duration = Duration::from_secs(60);

pub fn resources(text: &str) -> Resources {
    Resources::parse(text).expect("test resources parse")
}

/// An embedded cluster with one worker per entry of `workers` (their resources), and a driver.
pub async fn cluster(workers: &[&str]) -> (LocalCluster, Context) {
    chia_runtime::init_logging("warn");
    let cluster =
        LocalCluster::start(workers.iter().map(|w| resources(w)).collect()).await.expect("cluster starts");
    let cx = cluster.driver().await.expect("driver connects");
    (cluster, cx)
}
