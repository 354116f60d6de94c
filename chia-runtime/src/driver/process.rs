//! Child processes of tasks, and task cancellation as a task sees it.
//!
//! CHIA's functions mostly drive external tools (`make`, simulators). A function starts them
//! with [`Context::spawn`](crate::Context::spawn) (or `spawn_std`), which puts each child in a
//! process group of its own, marks it with the task (`CHIA_TASK_MARK`, inherited by all it
//! starts) and, in a contained worker with cgroups, places it in the task's cgroup. The
//! runtime then ends the task's processes — the children and everything they started, a
//! `setsid` daemon included — when the task is cancelled (SIGTERM, then SIGKILL after a grace
//! period, or SIGKILL at once when forced), when the task ends with processes still running,
//! and when the worker stops or loses its head. Which processes count as a task's, and what
//! holds where, is in [`contain`](super::contain).

use super::contain::{self, TaskCgroup, start_time};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How long a cancelled task's children have between SIGTERM and SIGKILL.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// The run has neither ended nor timed out yet.
const RUNNING: u8 = 0;
/// The run ended (its function returned, or was dropped) before any timeout.
const ENDED: u8 = 1;
/// The run's timeout passed before it ended: it is stopped and fails with `TimedOut`.
const TIMED_OUT: u8 = 2;

/// How a task's run ended, as decided between its end and its timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunEnd {
    /// Before its timeout, if it had one: its outcome is what the function returned.
    InTime,
    /// After its timeout stopped it: its outcome is `TimedOut`, whatever the function returned.
    TimedOut,
}

/// The cancellation state and child processes of one running task.
#[derive(Default)]
pub(crate) struct TaskControl {
    cancelled: AtomicBool,
    /// [`RUNNING`], [`ENDED`] or [`TIMED_OUT`]: one compare-and-swap decides whether a run that
    /// returns just as its timeout passes ended in time, so its outcome and whether its
    /// processes were killed by the timeout always agree.
    end: AtomicU8,
    notify: Notify,
    /// The process groups of the children still to be cleaned up.
    groups: Mutex<Vec<Group>>,
    /// The mark and cgroup of the task's children, made at its first spawn.
    tracked: Mutex<Option<Tracked>>,
    /// The thread a sync function runs on, while it runs: what it starts is the task's.
    thread: Mutex<Option<i32>>,
}

/// How a task's `Context::spawn` children are found again.
struct Tracked {
    /// The value of `CHIA_TASK_MARK` in their environment.
    mark: String,
    /// Their cgroup, in a worker contained by cgroup.
    cgroup: Option<Arc<TaskCgroup>>,
}

impl Drop for TaskControl {
    fn drop(&mut self) {
        if let Some(tracked) = self.tracked.get_mut().unwrap_or_else(|p| p.into_inner()) {
            contain::mark_dead(&tracked.mark);
        }
    }
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
        // Signal 0 only checks that the group exists and may be signalled.
        killpg(self.id, 0).is_ok()
    }
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

    /// Marks the task cancelled and signals its processes: SIGKILL when `force`, otherwise
    /// SIGTERM now and SIGKILL after [`CANCEL_GRACE`] if they are still there. When this task
    /// is the only thing running on the worker, the worker's loose processes can only be its
    /// own, and are signalled with it.
    pub(crate) fn cancel(self: &Arc<Self>, force: bool) {
        self.cancelled.store(true, Ordering::Release);
        self.notify.notify_waiters();
        let alone = contain::is_alone();
        if force {
            self.signal_children(libc::SIGKILL);
            if alone {
                contain::end_loose(libc::SIGKILL, "its only task was cancelled");
            }
            return;
        }
        self.signal_children(libc::SIGTERM);
        if alone {
            contain::end_loose(libc::SIGTERM, "its only task was cancelled");
        }
        let control = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CANCEL_GRACE).await;
            control.signal_children(libc::SIGKILL);
            if alone && contain::is_alone() {
                contain::end_loose(libc::SIGKILL, "its only task was cancelled");
            }
        });
    }

    /// The run's timeout passed: unless it ended first, it is from now on timed out, whatever
    /// it returns, and is cancelled with force — its processes SIGKILLed exactly as by
    /// `force_cancel` (with the worker's loose ones when it runs alone). True when this call
    /// timed it out.
    pub(crate) fn time_out(self: &Arc<Self>) -> bool {
        if self.end.compare_exchange(RUNNING, TIMED_OUT, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false; // Ended first (or timed out already).
        }
        self.cancel(true);
        true
    }

    /// The run is over (its function returned, or was dropped): says whether it ended in time
    /// or its timeout had stopped it, which decides its outcome. Asked once per run.
    pub(crate) fn end_run(&self) -> RunEnd {
        match self.end.compare_exchange(RUNNING, ENDED, Ordering::AcqRel, Ordering::Acquire) {
            Err(TIMED_OUT) => RunEnd::TimedOut,
            _ => RunEnd::InTime,
        }
    }

    /// SIGKILLs every process of the task that is still alive (at task end, or when the
    /// worker stops), and reaps those that are this process's children and have no handle to
    /// wait on them (a `Context::spawn` child's `Child` waits for itself).
    pub(crate) fn kill_children(&self) {
        let killed = self.signal_children(libc::SIGKILL);
        let leaders: Vec<i32> = {
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            let leaders = groups.iter().map(|g| g.id).collect();
            groups.clear();
            leaders
        };
        // The cgroup goes (once empty); a later spawn, by a service, makes another.
        if let Some(tracked) = self.tracked.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            tracked.cgroup = None;
        }
        contain::reap(killed.into_iter().filter(|pid| !leaders.contains(pid)).collect());
    }

    /// Signals the task's processes; returns the pids signalled one by one.
    fn signal_children(&self, signal: i32) -> Vec<i32> {
        for group in self.groups.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|g| g.is_ours()) {
            signal_group(group.id, signal);
        }
        let mut signalled = Vec::new();
        let tracked = self
            .tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| (t.mark.clone(), t.cgroup.clone()));
        match tracked {
            Some((_, Some(cgroup))) => {
                signalled.extend(cgroup.pids());
                cgroup.signal(signal);
            }
            // Without a cgroup, the mark finds what left the groups (a `setsid` daemon).
            Some((mark, None)) => {
                let entry = format!("{}={mark}", contain::TASK_MARK);
                signalled.extend(contain::kill_matching(signal, |p| contain::environ_has(p.pid, &entry)));
            }
            None => {}
        }
        let thread = *self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tid) = thread {
            for pid in contain::with_descendants(&contain::thread_children(tid)) {
                contain::send(pid, signal);
                signalled.push(pid);
            }
        }
        signalled
    }

    /// While the guard lives, what the calling thread starts (a plain `std::process::Command`
    /// in a sync function) is this task's; the guard's drop ends what is left of it.
    pub(crate) fn run_on_this_thread(&self) -> ThreadGuard<'_> {
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(contain::gettid());
        ThreadGuard { control: self }
    }

    /// The mark and cgroup for the next child, made at the first.
    fn tracking(&self) -> io::Result<(String, Option<Arc<TaskCgroup>>)> {
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        if tracked.is_none() {
            let mark = contain::new_task_mark();
            contain::mark_live(&mark);
            *tracked = Some(Tracked { mark, cgroup: None });
        }
        let tracked = tracked.as_mut().expect("set above");
        if tracked.cgroup.is_none() {
            tracked.cgroup = TaskCgroup::create()?.map(Arc::new);
        }
        Ok((tracked.mark.clone(), tracked.cgroup.clone()))
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

/// See [`TaskControl::run_on_this_thread`].
pub(crate) struct ThreadGuard<'a> {
    control: &'a TaskControl,
}

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        let tid = self.control.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(tid) = tid else { return };
        let left = contain::with_descendants(&contain::thread_children(tid));
        if left.is_empty() {
            return;
        }
        tracing::info!(count = left.len(), "ending processes a sync function left running");
        for &pid in &left {
            contain::send(pid, libc::SIGKILL);
        }
        // A `Context::spawn_std` child has a `Child` handle that may still wait for it.
        let leaders: Vec<i32> =
            self.control.groups.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|g| g.id).collect();
        contain::reap(left.into_iter().filter(|pid| !leaders.contains(pid)).collect());
    }
}

/// Signals a whole process group. A group that is gone already is not an error.
fn signal_group(group: i32, signal: i32) {
    if let Err(error) = killpg(group, signal)
        && error.raw_os_error() != Some(libc::ESRCH)
    {
        tracing::warn!(group, signal, %error, "cannot signal a process group");
    }
}

/// killpg(2): sends `signal` to every process of `group` (0: only checks it may).
#[allow(unsafe_code)]
fn killpg(group: i32, signal: i32) -> io::Result<()> {
    // SAFETY: killpg takes plain integers and only sends a signal; it touches no memory of
    // this process.
    if unsafe { libc::killpg(group, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to SIGKILL the calling process when the thread that started it dies (the
/// worker's, SIGKILL included). Called in a child between fork and exec.
#[allow(unsafe_code)]
fn set_pdeathsig() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only and touches no memory of
    // this process; as a plain system call it is safe between fork and exec.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Has the child of `command` enter the task's cgroup before `exec`, or, without one, ask for
/// SIGKILL when its parent thread dies.
#[allow(unsafe_code)]
fn contain_child(command: &mut std::process::Command, cgroup: Option<Arc<TaskCgroup>>) {
    use std::os::unix::process::CommandExt;
    let before_exec = move || match &cgroup {
        Some(cgroup) => cgroup.enter_from_child(),
        None => set_pdeathsig(),
    };
    // SAFETY: the closure runs in the child between fork and exec, where a threaded parent
    // allows only async-signal-safe work. It makes system calls only (open, write, close or
    // prctl), allocates nothing and takes no lock; the cgroup path it writes to was made
    // before the fork and lives in the captured `Arc`, which the command keeps alive.
    unsafe { command.pre_exec(before_exec) };
}

/// Starts `command` in a process group of its own, tracked by `control` when there is one.
pub(crate) fn spawn(
    control: Option<&TaskControl>,
    command: &mut tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    command.process_group(0).kill_on_drop(true);
    if let Some(control) = control {
        let (mark, cgroup) = control.tracking()?;
        command.env(contain::TASK_MARK, mark);
        // tokio's `pre_exec` is the std command's.
        contain_child(command.as_std_mut(), cgroup);
    }
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
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    if let Some(control) = control {
        let (mark, cgroup) = control.tracking()?;
        command.env(contain::TASK_MARK, mark);
        contain_child(command, cgroup);
    }
    let child = command.spawn()?;
    if let Some(control) = control {
        control.track(Some(child.id()))?;
    }
    Ok(child)
}
