//! Child processes of tasks, and task cancellation as a task sees it.
//!
//! CHIA's functions mostly drive external tools (`make`, simulators). A function starts them
//! with [`Context::spawn`](crate::Context::spawn) (or `spawn_std`), which puts each child in a
//! process group of its own and records it with the task. The runtime then kills those groups
//! — the child and everything it started — when the task is cancelled (SIGTERM, then SIGKILL
//! after a grace period, or SIGKILL at once when forced), when the task ends with children
//! still running, and when the worker stops or loses its head. No tool outlives its task.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How long a cancelled task's children have between SIGTERM and SIGKILL.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// The cancellation state and child process groups of one running task.
#[derive(Default)]
pub(crate) struct TaskControl {
    cancelled: AtomicBool,
    notify: Notify,
    /// The process groups of the children still to be cleaned up.
    groups: Mutex<Vec<Group>>,
}

/// A child's process group: its id (the child's pid) and when the child started, so a pid the
/// system gave to another process meanwhile is not signalled.
struct Group {
    id: i32,
    started: Option<u64>,
}

impl Group {
    /// Still ours to signal: the leader is the child we started, or it has exited and members
    /// of its group may remain (a group id is not reused while the group exists).
    fn is_ours(&self) -> bool {
        match start_time(self.id) {
            Some(started) => self.started == Some(started),
            None => true,
        }
    }

    fn exists(&self) -> bool {
        // SAFETY: signal 0 only checks that the group exists and may be signalled.
        unsafe { libc::killpg(self.id, 0) == 0 }
    }
}

/// When process `pid` started (clock ticks since boot, `/proc/<pid>/stat` field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start with field 3 (the state).
    stat.rsplit_once(") ")?.1.split(' ').nth(22 - 3)?.parse().ok()
}

impl TaskControl {
    pub(crate) fn new() -> Arc<TaskControl> {
        Arc::default()
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    pub(crate) async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Marks the task cancelled and signals its children: SIGKILL when `force`, otherwise
    /// SIGTERM now and SIGKILL after [`CANCEL_GRACE`] if they are still there.
    pub(crate) fn cancel(self: &Arc<Self>, force: bool) {
        self.cancelled.store(true, Ordering::Release);
        self.notify.notify_waiters();
        if force {
            self.kill_children();
            return;
        }
        self.signal_children(libc::SIGTERM);
        let control = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CANCEL_GRACE).await;
            control.kill_children();
        });
    }

    /// SIGKILLs every child group that is still alive (at task end, or when the worker stops).
    pub(crate) fn kill_children(&self) {
        self.signal_children(libc::SIGKILL);
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn signal_children(&self, signal: i32) {
        for group in self.groups.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|g| g.is_ours()) {
            signal_group(group.id, signal);
        }
    }

    fn track(&self, pid: Option<u32>) -> io::Result<()> {
        let pid = pid.ok_or_else(|| io::Error::other("the child exited before it could be tracked"))?;
        let id = i32::try_from(pid).map_err(io::Error::other)?;
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `cancel` signals under, so no child slips between the two.
        if self.is_cancelled() {
            // Started after the cancellation: it must not survive it.
            signal_group(id, libc::SIGKILL);
            return Err(io::Error::other("the task is cancelled"));
        }
        // Groups that are gone need no cleanup: a task that runs many tools keeps a short list.
        groups.retain(Group::exists);
        groups.push(Group { id, started: start_time(id) });
        Ok(())
    }
}

/// Signals a whole process group. A group that is gone already is not an error.
fn signal_group(group: i32, signal: i32) {
    // SAFETY: killpg only sends a signal; it touches no memory of this process.
    let result = unsafe { libc::killpg(group, signal) };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!("cannot signal process group {group}: {error}");
        }
    }
}

/// Starts `command` in a process group of its own, tracked by `control` when there is one.
pub(crate) fn spawn(
    control: Option<&TaskControl>,
    command: &mut tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    command.process_group(0).kill_on_drop(true);
    let child = command.spawn()?;
    if let Some(control) = control {
        control.track(child.id())?;
    }
    Ok(child)
}

/// [`spawn`] for `std::process::Command`.
pub(crate) fn spawn_std(
    control: Option<&TaskControl>,
    command: &mut std::process::Command,
) -> io::Result<std::process::Child> {
    std::os::unix::process::CommandExt::process_group(command, 0);
    let child = command.spawn()?;
    if let Some(control) = control {
        control.track(Some(child.id()))?;
    }
    Ok(child)
}
