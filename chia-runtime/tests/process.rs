//! Child processes started by tasks do not outlive them.

extern crate chia_runtime as chia;

mod common;

use chia::Context;
use common::cluster;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// Starts a shell that starts two long sleeps (a process tree), and returns their pids without
/// waiting for them: the task ends with its children still running.
#[chia::function]
async fn leave_a_tree_running(cx: &Context) -> Result<Vec<u32>, std::io::Error> {
    let mut command = tokio::process::Command::new("sh");
    command
        .args(["-c", "sleep 300 & echo $!; sleep 300 & echo $!; wait"])
        .stdout(std::process::Stdio::piped());
    let mut shell = cx.spawn(&mut command)?;
    let mut pids = vec![shell.id().expect("the shell runs")];
    let stdout = shell.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while pids.len() < 3 {
        let line = lines.next_line().await?.expect("the shell prints two pids");
        pids.push(line.trim().parse().expect("a pid"));
    }
    // Keep the handle alive past the return: only the runtime's cleanup may stop the tree.
    std::mem::forget(shell);
    Ok(pids)
}

/// The same from a sync function with `std::process`.
#[chia::function]
fn leave_a_child_running_sync(cx: &Context) -> Result<u32, std::io::Error> {
    let child = cx.spawn_std(std::process::Command::new("sleep").arg("300"))?;
    let pid = child.id();
    std::mem::forget(child);
    Ok(pid)
}

/// Running, or a zombie that nobody has reaped yet (which runs nothing).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until every pid has stopped running; false if they are still running at the bound.
async fn all_stop(pids: &[u32]) -> bool {
    let deadline = tokio::time::Instant::now() + common::BOUND;
    while tokio::time::Instant::now() < deadline {
        if !pids.iter().any(|&pid| is_running(pid)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_takes_its_process_tree_with_it() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let pids = leave_a_tree_running::remote(&cx).get_timeout(common::BOUND).await.unwrap();
    assert_eq!(pids.len(), 3);
    assert!(
        all_stop(&pids).await,
        "still running: {:?}",
        pids.iter().filter(|&&p| is_running(p)).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_task_that_ends_takes_its_child_with_it() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let pid = leave_a_child_running_sync::remote(&cx).get_timeout(common::BOUND).await.unwrap();
    assert!(all_stop(&[pid]).await, "sleep {pid} still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_task_a_child_gets_its_own_group_and_dies_with_its_handle() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let child = cx.spawn(tokio::process::Command::new("sleep").arg("300")).unwrap();
    let pid = child.id().unwrap();
    let group = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = group.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[2], pid.to_string(), "the child leads its own process group");
    drop(child);
    assert!(all_stop(&[pid]).await);
}
