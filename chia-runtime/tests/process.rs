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

/// Starts a process tree that would sleep for minutes, records its pids in `pid_file`, then
/// waits for it: only cancellation ends it early.
#[chia::function]
async fn run_a_long_tree(cx: &Context, pid_file: String) -> Result<String, std::io::Error> {
    let script = format!(
        "echo $$ > {pid_file}.tmp; sleep 300 & echo $! >> {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; wait"
    );
    let status = cx.spawn(tokio::process::Command::new("sh").args(["-c", &script]))?.wait().await?;
    Ok(format!("the tree ended: {status}, cancelled: {}", cx.is_cancelled()))
}

/// Like `run_a_long_tree`, but the tree ignores SIGTERM: the shell writes `marker` when it gets
/// one and keeps waiting, and its child ignores it.
#[chia::function]
async fn run_a_stubborn_tree(
    cx: &Context,
    pid_file: String,
    marker: String,
) -> Result<String, std::io::Error> {
    let script = format!(
        "trap 'echo term > {marker}.tmp; mv {marker}.tmp {marker}' TERM; (trap '' TERM; exec sleep 300) & child=$!; \
         echo $$ > {pid_file}.tmp; echo $child >> {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; \
         while kill -0 $child 2>/dev/null; do wait $child; done"
    );
    let status = cx.spawn(tokio::process::Command::new("sh").args(["-c", &script]))?.wait().await?;
    Ok(format!("the tree ended: {status}"))
}

/// Needs a resource no node has, so it stays queued.
#[chia::function(resources(unobtainium = 1))]
fn never_placed() -> u32 {
    7
}

/// The text of `path` once it exists (the scripts rename their files into place whole).
async fn file_text(path: &std::path::Path) -> String {
    let deadline = tokio::time::Instant::now() + common::BOUND;
    while tokio::time::Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} was never written", path.display());
}

/// The pids a script wrote to `path`.
async fn pids_in(path: &std::path::Path) -> Vec<u32> {
    file_text(path).await.lines().map(|line| line.trim().parse().expect("a pid")).collect()
}

fn is_cancelled(error: &chia::Error) -> bool {
    matches!(error, chia::Error::Task(chia::TaskError::Cancelled { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_queued_task_drops_it() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let queued = never_placed::remote(&cx);
    queued.cancel().unwrap();
    let error = queued.get_timeout(common::BOUND).await.unwrap_err();
    assert!(is_cancelled(&error), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_kills_its_process_tree() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let running = run_a_long_tree::remote(&cx, pid_file.display().to_string());
    let pids = pids_in(&pid_file).await;
    assert_eq!(pids.len(), 2);
    running.cancel().unwrap();
    let error = running.get_timeout(common::BOUND).await.unwrap_err();
    assert!(is_cancelled(&error), "{error:?}");
    assert!(all_stop(&pids).await, "the tree survived its cancelled task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (pid_file, marker) = (dir.path().join("pids"), dir.path().join("terminated"));
    let running =
        run_a_stubborn_tree::remote(&cx, pid_file.display().to_string(), marker.display().to_string());
    let pids = pids_in(&pid_file).await;
    running.cancel().unwrap();
    // The polite request arrives (the shell notes it and carries on)...
    file_text(&marker).await;
    // ...and since the tree ignores it, SIGKILL follows once the grace period is over.
    assert!(all_stop(&pids).await, "a tree that ignores SIGTERM survived its cancellation");
    assert!(is_cancelled(&running.get_timeout(common::BOUND).await.unwrap_err()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_cancel_kills_without_asking_first() {
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (pid_file, marker) = (dir.path().join("pids"), dir.path().join("terminated"));
    let running =
        run_a_stubborn_tree::remote(&cx, pid_file.display().to_string(), marker.display().to_string());
    let pids = pids_in(&pid_file).await;
    running.force_cancel().unwrap();
    // The function returns once its tool is killed; the caller still sees Cancelled.
    assert!(is_cancelled(&running.get_timeout(common::BOUND).await.unwrap_err()));
    assert!(all_stop(&pids).await);
    assert!(!marker.exists(), "a forced cancel sent SIGTERM first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_leaves_takes_its_running_tools_with_it() {
    let (cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let leaving = cluster.driver().await.unwrap();
    let _running = run_a_long_tree::remote(&leaving, pid_file.display().to_string());
    let pids = pids_in(&pid_file).await;
    leaving.shutdown().await;
    assert!(all_stop(&pids).await, "the departed driver's tool still runs");
    // The cluster goes on serving the other driver.
    leave_a_child_running_sync::remote(&cx).get_timeout(common::BOUND).await.unwrap();
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

/// A shell started with `cx.spawn` that daemonizes a child with `setsid` (leaving the shell's
/// process group and session), writes the daemon's pid to `pid_file`, and waits.
#[chia::function]
async fn run_a_daemonizing_shell(cx: &Context, pid_file: String) -> Result<String, std::io::Error> {
    let script = format!(
        "setsid sh -c 'echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 300' & wait"
    );
    let status = cx.spawn(tokio::process::Command::new("sh").args(["-c", &script]))?.wait().await?;
    Ok(format!("the shell ended: {status}"))
}

/// Starts a helper with a plain `std::process::Command` (not `cx.spawn_std`), writes its pid
/// to `pid_file` and blocks waiting for it.
#[chia::function]
fn wait_for_a_plain_child(pid_file: String) -> Result<String, std::io::Error> {
    let mut helper = std::process::Command::new("sleep").arg("300").spawn()?;
    std::fs::write(format!("{pid_file}.tmp"), helper.id().to_string())?;
    std::fs::rename(format!("{pid_file}.tmp"), &pid_file)?;
    Ok(format!("the helper ended: {}", helper.wait()?))
}

/// Kills `pids` if the test fails before they are gone.
struct PidGuard(Vec<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        for &pid in self.0.iter().filter(|&&pid| is_running(pid)) {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setsid_daemon_of_a_spawned_shell_ends_with_its_cancelled_task() {
    // The embedded cluster has no cgroup: the task's mark in the daemon's environment finds it.
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("daemon");
    let running = run_a_daemonizing_shell::remote(&cx, pid_file.display().to_string());
    let guard = PidGuard(pids_in(&pid_file).await);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", guard.0[0])).unwrap();
    let session = stat.rsplit_once(") ").unwrap().1.split(' ').nth(3).unwrap().to_string();
    assert_eq!(session, guard.0[0].to_string(), "the daemon leads a session of its own");
    running.cancel().unwrap();
    assert!(is_cancelled(&running.get_timeout(common::BOUND).await.unwrap_err()));
    assert!(all_stop(&guard.0).await, "the setsid daemon survived its cancelled task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_task_blocked_on_a_plain_child_is_answered_when_cancelled() {
    // Another task runs beside it: the helper is found as the task thread's child, not as
    // the worker's only task's.
    let (_cluster, cx) = cluster(&["CPU=2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (other_file, pid_file) = (dir.path().join("other"), dir.path().join("helper"));
    let other = run_a_long_tree::remote(&cx, other_file.display().to_string());
    let other_pids = PidGuard(pids_in(&other_file).await);
    let running = wait_for_a_plain_child::remote(&cx, pid_file.display().to_string());
    let guard = PidGuard(pids_in(&pid_file).await);
    running.cancel().unwrap();
    assert!(is_cancelled(&running.get_timeout(common::BOUND).await.unwrap_err()));
    assert!(all_stop(&guard.0).await, "the plain child survived its cancelled task");
    assert!(other_pids.0.iter().all(|&pid| is_running(pid)), "the other task's tools were ended too");
    other.cancel().unwrap();
    assert!(all_stop(&other_pids.0).await);
}
