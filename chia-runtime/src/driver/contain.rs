//! Containment of every process a task starts, however it starts it.
//!
//! Process groups alone do not hold: a tool that calls `setsid` leaves its group, a child
//! started with a plain `std::process::Command` is in no tracked group, and a SIGKILLed worker
//! cleans up nothing. A worker binary therefore calls [`contain_worker`] first thing in `main`,
//! which picks one of two mechanisms:
//!
//! - **cgroup** (cgroup2 with `cgroup.kill`, Linux ≥ 5.14, and permission to create cgroups):
//!   the worker moves itself into `<cgroup2>/<its cgroup>/chia-worker-<pid>/worker`. Whatever
//!   any of its threads starts lands there, and nothing can leave it (`setsid` and double forks
//!   change the session, not the cgroup). Children started with `Context::spawn` are placed
//!   (before `exec`) in a cgroup of their task, `…/task-<n>`, which `cgroup.kill` ends whole.
//! - **fallback** (no usable cgroup2, or `CHIA_PROCESS_CONTAINMENT=fallback`): the worker
//!   becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`: orphaned descendants are re-parented
//!   to it, so they stay in its process tree) and sets `CHIA_WORKER_MARK=<nonce>` in its own
//!   environment, which every process it starts inherits. `Context::spawn` children also carry
//!   `CHIA_TASK_MARK=<nonce>.<n>`, get their own process group and `PR_SET_PDEATHSIG`
//!   (SIGKILL). A task's processes are its groups plus every process whose environment holds
//!   its mark — a `setsid` daemon included. A process that empties its environment
//!   (`env -i`) and leaves its group escapes this path (not the cgroup one).
//!
//! In both, a **sentinel** forked at the worker's start (while it is still one thread, so the
//! fork copies no lock held by another thread) waits for the end of a pipe only the worker
//! holds. When the worker dies — SIGKILL included — the pipe reaches end of file and the
//! sentinel ends what is left: the worker's whole cgroup (`cgroup.kill`), or every process
//! carrying the worker's mark. The sentinel lives outside the worker's cgroup and ignores the
//! signals a terminal or a supervisor sends to the worker's group.
//!
//! Which processes belong to which task, when tasks run side by side (the rule):
//! 1. what `Context::spawn`/`spawn_std` starts, and everything that starts, is its task's;
//! 2. what a sync function's thread starts any other way (plain `std::process::Command`), with
//!    the descendants still in that process tree, is that task's (the kernel lists each
//!    thread's children: `/proc/self/task/<tid>/children`);
//! 3. anything else started on the worker (a plain `Command` from an async function, a daemon
//!    whose parent exited) is *loose*: ended when nothing else runs on the worker — a task
//!    ending or being cancelled while no other task, service instance or call runs — and always
//!    when the worker stops, loses its head or dies. A loose process is never ended for
//!    another task while one that may own it still runs.
//!
//! Without [`contain_worker`] (the embedded cluster, whose workers live in the user's own
//! process; a `Worker` started by a test) there is no sentinel and no loose processes (the
//! process's other children are the user's own): only rules 1 and 2 hold, through groups,
//! marks and `PR_SET_PDEATHSIG`.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable that forces a mechanism: `auto` (default), `cgroup`, `fallback`.
pub const CONTAINMENT_ENV: &str = "CHIA_PROCESS_CONTAINMENT";
/// Environment variable every process a fallback worker starts inherits (its value: the nonce).
pub const WORKER_MARK: &str = "CHIA_WORKER_MARK";
/// Environment variable of each `Context::spawn` child: which task started it.
pub const TASK_MARK: &str = "CHIA_TASK_MARK";

/// How long the sentinel waits for a killed cgroup to empty before it gives up removing it.
const SENTINEL_BOUND: Duration = Duration::from_secs(10);
/// Rounds of "find, kill" before a kill loop stops: each round kills every process it found,
/// and only a process not killed yet can start another, so a few rounds empty a tree.
const KILL_ROUNDS: usize = 64;

/// What went wrong setting up containment.
#[derive(Debug, thiserror::Error)]
pub enum ContainError {
    #[error("{CONTAINMENT_ENV}={0:?} is not one of auto, cgroup, fallback")]
    BadMode(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no cgroup2 hierarchy is mounted (none in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{path} has no cgroup.kill (kernel {kernel}; it arrived in Linux 5.14)")]
    NoCgroupKill { path: PathBuf, kernel: String },
    #[error("the worker moved itself to {wanted} but /proc/self/cgroup says {found}")]
    NotMoved { wanted: String, found: String },
    #[error("containment must be set up while the process has one thread; it has {0}")]
    Threaded(usize),
    #[error("cannot start the sentinel process: {0}")]
    Sentinel(io::Error),
    #[error("containment is already set up in this process")]
    AlreadyContained,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ContainError + '_ {
    move |source| ContainError::Io { path: path.to_path_buf(), source }
}

/// Which mechanism contains a worker's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// A cgroup2 cgroup for the worker and one per task.
    Cgroup,
    /// Subreaper, process groups, environment marks and `PR_SET_PDEATHSIG`.
    Fallback,
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mechanism::Cgroup => "cgroup",
            Mechanism::Fallback => "fallback",
        })
    }
}

/// The worker's containment, once set up.
struct Contained {
    mechanism: Mechanism,
    /// The worker's cgroup (`chia-worker-<pid>`) in the cgroup mechanism.
    cgroup: Option<PathBuf>,
    sentinel: i32,
    /// The write end of the sentinel's pipe: kept open for the life of the process, so the
    /// sentinel sees its end exactly when the worker dies.
    _pipe: OwnedFd,
}

static CONTAINED: OnceLock<Contained> = OnceLock::new();

/// What names this process's marks: its pid and start time, so two processes never share it.
static NONCE: LazyLock<String> = LazyLock::new(|| {
    let pid = std::process::id();
    format!("{pid}.{}", start_time(pid as i32).unwrap_or(0))
});

/// Sets up containment for a worker process (see the module's documentation). Call it first
/// thing in `main`, before any thread exists (before the tokio runtime): it forks the
/// sentinel. Returns the mechanism chosen.
pub fn contain_worker() -> Result<Mechanism, ContainError> {
    if CONTAINED.get().is_some() {
        return Err(ContainError::AlreadyContained);
    }
    let wanted = match std::env::var(CONTAINMENT_ENV) {
        Ok(value) => match value.as_str() {
            "" | "auto" => None,
            "cgroup" => Some(Mechanism::Cgroup),
            "fallback" => Some(Mechanism::Fallback),
            _ => return Err(ContainError::BadMode(value)),
        },
        Err(_) => None,
    };
    let threads = thread_count();
    if threads != 1 {
        return Err(ContainError::Threaded(threads));
    }
    // The cgroup is made before the fork, so the sentinel knows it, and joined after, so the
    // sentinel stays outside what it will kill.
    let prepared = match wanted {
        Some(Mechanism::Fallback) => None,
        _ => match prepare_cgroup() {
            Ok(cgroup) => Some(cgroup),
            Err(error) if wanted.is_none() => {
                tracing::info!(%error, "no cgroup for this worker; containing its processes the fallback way");
                None
            }
            Err(error) => return Err(error),
        },
    };
    // Made before the fork: the sentinel must know the worker's nonce, not make its own.
    let nonce = NONCE.clone();
    let (read, write) = pipe().map_err(ContainError::Sentinel)?;
    let sentinel = fork_single_threaded()?;
    if sentinel == 0 {
        drop(write);
        sentinel_main(read, prepared.as_deref(), nonce);
    }
    drop(read);
    let mut write = std::fs::File::from(write);
    let joined = prepared.as_deref().map(join_cgroup);
    let (mechanism, cgroup) = match (prepared, joined) {
        (Some(cgroup), Some(Ok(()))) => (Mechanism::Cgroup, Some(cgroup)),
        (Some(cgroup), Some(Err(error))) => {
            let _ = std::fs::remove_dir(cgroup.join("worker"));
            let _ = std::fs::remove_dir(&cgroup);
            if wanted == Some(Mechanism::Cgroup) {
                return Err(error);
            }
            tracing::info!(%error, "cannot join a cgroup; containing this worker's processes the fallback way");
            (Mechanism::Fallback, None)
        }
        _ => (Mechanism::Fallback, None),
    };
    if mechanism == Mechanism::Fallback {
        set_worker_mark()?;
        if let Err(error) = become_child_subreaper() {
            tracing::warn!(%error, "cannot become a child subreaper");
        }
    }
    // Tells the sentinel which mechanism to clean up after; it then waits for end of file.
    let byte = if mechanism == Mechanism::Cgroup { b'c' } else { b'f' };
    write.write_all(&[byte]).map_err(ContainError::Sentinel)?;
    let contained = Contained { mechanism, cgroup, sentinel, _pipe: OwnedFd::from(write) };
    tracing::info!(%mechanism, cgroup = ?contained.cgroup, sentinel, "processes of tasks are contained");
    CONTAINED.set(contained).map_err(|_| ContainError::AlreadyContained)?;
    Ok(mechanism)
}

/// The mechanism of this process's worker containment, if [`contain_worker`] set one up.
pub fn mechanism() -> Option<Mechanism> {
    CONTAINED.get().map(|c| c.mechanism)
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|dir| dir.count()).unwrap_or(0)
}

/// The sentinel's pipe: (read end, write end). std's pipe is close-on-exec (`pipe2` with
/// `O_CLOEXEC` on Linux), so no child inherits the write end, which would keep the pipe open
/// past the worker's death.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = io::pipe()?;
    Ok((read.into(), write.into()))
}

/// Forks this process, which must have one thread; `Ok(0)` in the child, the child's pid in
/// the parent. Checks the thread count itself ([`ContainError::Threaded`]): the child of a
/// threaded process may find locks (the allocator's) held forever by threads it lacks.
#[allow(unsafe_code)]
fn fork_single_threaded() -> Result<libc::pid_t, ContainError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ContainError::Threaded(threads));
    }
    // SAFETY: the process has one thread (checked just above, and only this thread could have
    // started another since), so the child is a whole copy of it: no lock is held by a thread
    // that does not exist there, and it may allocate and run ordinary code, as the sentinel
    // does.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ContainError::Sentinel(io::Error::last_os_error()));
    }
    Ok(pid)
}

/// Puts `CHIA_WORKER_MARK=<nonce>` into this process's environment, for every process it
/// starts to inherit. Only while the process has one thread ([`ContainError::Threaded`]
/// otherwise).
#[allow(unsafe_code)]
fn set_worker_mark() -> Result<(), ContainError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ContainError::Threaded(threads));
    }
    // SAFETY: the process has one thread (checked just above; the sentinel is another
    // process), so nothing reads or writes the environment at the same time.
    unsafe { std::env::set_var(WORKER_MARK, NONCE.as_str()) };
    Ok(())
}

/// Makes this process a child subreaper: its orphaned descendants are re-parented to it
/// instead of to init, so they stay in its process tree.
#[allow(unsafe_code)]
fn become_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integer arguments only and reads or writes
    // no memory of this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where cgroup2 is mounted: `/sys/fs/cgroup` on a unified system, `/sys/fs/cgroup/unified`
/// on a hybrid one.
fn cgroup2_mount() -> Result<PathBuf, ContainError> {
    let mountinfo = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(mountinfo).map_err(io_at(mountinfo))?;
    // Fields: id parent major:minor root mount-point options... - fstype source options.
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split(' ').next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(left.split(' ').nth(4)?))
        })
        .ok_or(ContainError::NoCgroup2)
}

/// This process's cgroup2 path (the `0::` line of `/proc/self/cgroup`).
fn own_cgroup() -> Result<String, ContainError> {
    let file = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(file).map_err(io_at(file))?;
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_string).ok_or(ContainError::NoCgroup2)
}

/// Makes `chia-worker-<pid>/worker` beside this process, where the worker will move.
fn prepare_cgroup() -> Result<PathBuf, ContainError> {
    let mount = cgroup2_mount()?;
    let own = own_cgroup()?;
    let parent = mount.join(own.trim_start_matches('/'));
    let cgroup = parent.join(format!("chia-worker-{}", std::process::id()));
    std::fs::create_dir(&cgroup).map_err(io_at(&cgroup))?;
    let made = (|| {
        let kill = cgroup.join("cgroup.kill");
        if !kill.exists() {
            let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            return Err(ContainError::NoCgroupKill { path: kill, kernel: kernel.trim().to_string() });
        }
        let worker = cgroup.join("worker");
        std::fs::create_dir(&worker).map_err(io_at(&worker))
    })();
    if let Err(error) = made {
        let _ = std::fs::remove_dir(&cgroup);
        return Err(error);
    }
    Ok(cgroup)
}

fn join_cgroup(cgroup: &Path) -> Result<(), ContainError> {
    let procs = cgroup.join("worker").join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).map_err(io_at(&procs))?;
    let found = own_cgroup()?;
    if !found.ends_with(&format!("chia-worker-{}/worker", std::process::id())) {
        return Err(ContainError::NotMoved { wanted: procs.display().to_string(), found });
    }
    Ok(())
}

/// The sentinel: waits for the worker to die, then ends what it left. Never returns.
fn sentinel_main(pipe: OwnedFd, cgroup: Option<&Path>, nonce: String) -> ! {
    detach_sentinel();
    drop_worker_descriptors(pipe.as_raw_fd());
    let mut pipe = std::fs::File::from(pipe);
    let mut byte = [0u8; 1];
    let mechanism = match pipe.read(&mut byte) {
        Ok(1) if byte[0] == b'c' => Some(Mechanism::Cgroup),
        Ok(1) => Some(Mechanism::Fallback),
        // The worker died before it chose: clean what it may have begun.
        _ => None,
    };
    // Nothing else is ever written: read returns 0 (end of file) when the worker is gone.
    let mut rest = [0u8; 64];
    while !matches!(pipe.read(&mut rest), Ok(0)) {}
    let started = Instant::now();
    let ended = match (mechanism, cgroup) {
        (Some(Mechanism::Cgroup) | None, Some(cgroup)) => remove_cgroup_tree(cgroup, SENTINEL_BOUND),
        _ => {
            let needle = format!("{WORKER_MARK}={nonce}");
            kill_matching(libc::SIGKILL, |p| p.pid != own_pid() && environ_has(p.pid, &needle)).len()
        }
    };
    if ended > 0 {
        eprintln!(
            "chia-sentinel: the worker is gone; ended {ended} process(es) it left, in {:?}",
            started.elapsed()
        );
    }
    exit_at_once(0)
}

/// Takes the sentinel out of the worker's process group, deaf to what is sent to it (Ctrl-C
/// in a terminal, a supervisor's SIGTERM to the group): it must outlive the worker. And
/// names it `chia-sentinel` in `ps`.
#[allow(unsafe_code)]
fn detach_sentinel() {
    // SAFETY: setpgid and signal take plain integers (SIG_IGN installs no handler, so no code
    // of ours runs on a signal); prctl(PR_SET_NAME) reads the NUL-terminated static name,
    // which outlives the call. None of them touches other memory of this process.
    unsafe {
        libc::setpgid(0, 0);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
            libc::signal(signal, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"chia-sentinel".as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// Leaves the sentinel no descriptor of the worker's (its sockets, a test's pipes) but `keep`
/// (the pipe) and stderr: stdin and stdout become `/dev/null`, every other one is closed.
/// Only for the sentinel, which never returns to the worker's code.
#[allow(unsafe_code)]
fn drop_worker_descriptors(keep: i32) {
    if let Ok(dev_null) = std::fs::File::open("/dev/null") {
        // SAFETY: dup2 replaces descriptors 0 and 1, which nothing in the sentinel reads or
        // writes through a Rust handle; `dev_null` is open for the duration of the calls.
        unsafe {
            libc::dup2(dev_null.as_raw_fd(), 0);
            libc::dup2(dev_null.as_raw_fd(), 1);
        }
    }
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for fd in open.into_iter().filter(|&fd| fd > 2 && fd != keep) {
        // SAFETY: these are the worker's descriptors, copied by the fork; the handles that own
        // them are the worker's, which the sentinel never drops (it never returns). The
        // sentinel has one thread and no code it runs uses those handles: it reads `keep`,
        // logs to stderr (2, kept) and opens short-lived files of its own (which may take a
        // closed number, and are the only users of it then).
        unsafe { libc::close(fd) };
    }
}

/// Ends this process with `code` at once: no atexit handler, destructor or stdio flush of the
/// worker's copied state runs.
#[allow(unsafe_code)]
fn exit_at_once(code: i32) -> ! {
    // SAFETY: _exit takes an integer, ends the process and never returns; nothing of this
    // process is used after it.
    unsafe { libc::_exit(code) }
}

/// Kills everything in `cgroup` and below, waits (up to `bound`) until it is empty and removes
/// it. Returns how many processes were in it.
fn remove_cgroup_tree(cgroup: &Path, bound: Duration) -> usize {
    let count = cgroup_pids_deep(cgroup).len();
    if let Err(error) = std::fs::write(cgroup.join("cgroup.kill"), "1")
        && error.kind() != io::ErrorKind::NotFound
    {
        eprintln!("chia-sentinel: cannot kill {}: {error}", cgroup.display());
    }
    let deadline = Instant::now() + bound;
    while is_populated(cgroup) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_dirs(cgroup);
    count
}

/// Removes `dir` and its sub-cgroups, children first (a cgroup with children cannot go).
fn remove_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dirs(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn is_populated(cgroup: &Path) -> bool {
    match std::fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(events) => events.lines().any(|line| line == "populated 1"),
        Err(_) => false,
    }
}

fn cgroup_pids(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn cgroup_pids_deep(cgroup: &Path) -> Vec<i32> {
    let mut pids = cgroup_pids(cgroup);
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids_deep(&entry.path()));
            }
        }
    }
    pids
}

fn own_pid() -> i32 {
    std::process::id() as i32
}

/// One line of `/proc/<pid>/stat`, the parts used here.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub zombie: bool,
}

/// Every process visible in `/proc`.
pub(crate) fn processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name start with field 3 (the state).
        let mut rest = stat.rsplit_once(") ")?.1.split(' ');
        let state = rest.next()?;
        let ppid = rest.next()?.parse().ok()?;
        Some(ProcStat { pid, ppid, zombie: state == "Z" || state == "X" })
    })
    .collect()
}

/// When process `pid` started (clock ticks since boot, `/proc/<pid>/stat` field 22).
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(22 - 3)?.parse().ok()
}

/// Whether `pid`'s environment has the entry `needle` (`NAME=value`, whole).
pub(crate) fn environ_has(pid: i32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|entry| entry == needle.as_bytes()))
}

/// Signals every live process `select` picks, and, for SIGKILL, looks again until a round
/// finds none (a process may have started another meanwhile). Returns the pids signalled.
pub(crate) fn kill_matching(signal: i32, select: impl Fn(&ProcStat) -> bool) -> Vec<i32> {
    let mut signalled = Vec::new();
    let rounds = if signal == libc::SIGKILL { KILL_ROUNDS } else { 1 };
    for _ in 0..rounds {
        let found: Vec<i32> = processes()
            .iter()
            .filter(|p| !p.zombie && p.pid != own_pid() && select(p))
            .map(|p| p.pid)
            .collect();
        if found.is_empty() {
            break;
        }
        for &pid in &found {
            send(pid, signal);
        }
        signalled.extend(found);
    }
    signalled
}

/// `pids` and every live descendant of them still in their process tree.
pub(crate) fn with_descendants(roots: &[i32]) -> Vec<i32> {
    if roots.is_empty() {
        // The common case (a task that started nothing) must not scan `/proc`: it is on the
        // path of every sync task.
        return Vec::new();
    }
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in processes().iter().filter(|p| !p.zombie) {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut seen: HashSet<i32> = HashSet::new();
    let mut stack = roots.to_vec();
    while let Some(pid) = stack.pop() {
        if seen.insert(pid) {
            stack.extend(children.get(&pid).into_iter().flatten());
        }
    }
    seen.into_iter().collect()
}

/// Sends `signal` to `pid`; a process already gone is not an error.
#[allow(unsafe_code)]
pub(crate) fn send(pid: i32, signal: i32) {
    // SAFETY: kill takes plain integers and only sends a signal; it touches no memory of this
    // process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pid, signal, %error, "cannot signal a process");
        }
    }
}

/// The children that thread `tid` of this process started (and that still run).
pub(crate) fn thread_children(tid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/children"))
        .map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// The children of every thread of this process; `None` if `/proc` cannot tell.
fn own_children() -> Option<Vec<i32>> {
    let threads = std::fs::read_dir("/proc/self/task").ok()?;
    Some(
        threads
            .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .flat_map(thread_children)
            .collect(),
    )
}

/// The calling thread's id.
#[allow(unsafe_code)]
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::gettid() }
}

/// Reaps, in the background, those of `pids` that are this process's children once they have
/// died: killed processes nobody will wait for (their task ended) must not stay zombies, and a
/// subreaper adopts orphans it must reap. Waits for each pid only, never for "any child" (that
/// would take statuses that a `Child` handle elsewhere waits for).
pub(crate) fn reap(pids: Vec<i32>) {
    if pids.is_empty() {
        // Every task ends here; one that killed nothing must not scan `/proc`.
        return;
    }
    let ours: Vec<i32> = {
        let me = own_pid();
        let parents: HashMap<i32, i32> = processes().into_iter().map(|p| (p.pid, p.ppid)).collect();
        pids.into_iter().filter(|pid| parents.get(pid) == Some(&me)).collect()
    };
    if ours.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new().name("chia-reaper".into()).spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut left = ours;
        while !left.is_empty() && Instant::now() < deadline {
            left.retain(|&pid| !try_reap(pid));
            if !left.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start a thread to reap killed processes");
    }
}

/// Reaps child `pid` if it has ended, without blocking. False while it still runs; true once
/// it is reaped, or if it is not (or no longer) this process's child.
#[allow(unsafe_code)]
fn try_reap(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: `status` is a live, writable int for waitpid to fill; WNOHANG returns at once,
    // and the wait is for this one pid, never for any child.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) != 0 }
}

/// The cgroup a task's `Context::spawn` children go to (cgroup mechanism only).
pub(crate) struct TaskCgroup {
    path: PathBuf,
    /// `…/cgroup.procs`, ready for the child's `pre_exec`, which may not allocate.
    procs: CString,
}

static TASK_CGROUPS: AtomicU64 = AtomicU64::new(0);
/// Task cgroups killed whose processes had not all exited when they were to be removed.
static UNREMOVED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

impl TaskCgroup {
    /// A new cgroup under the worker's, if the worker has one.
    pub(crate) fn create() -> io::Result<Option<TaskCgroup>> {
        let Some(root) = CONTAINED.get().and_then(|c| c.cgroup.as_ref()) else { return Ok(None) };
        let path = root.join(format!("task-{}", TASK_CGROUPS.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let procs = CString::new(path.join("cgroup.procs").into_os_string().into_encoded_bytes())
            .map_err(io::Error::other)?;
        Ok(Some(TaskCgroup { path, procs }))
    }

    /// Moves the calling process into this cgroup. Runs in a forked child before `exec`, so it
    /// only makes system calls (no allocation).
    #[allow(unsafe_code)]
    pub(crate) fn enter_from_child(&self) -> io::Result<()> {
        // SAFETY: open, write and close are async-signal-safe, so they may run between fork
        // and exec in the child of a threaded worker; nothing here allocates or takes a lock.
        // `procs` is a NUL-terminated path made before the fork and owned by `self`, which
        // outlives the call; the written byte is a static; `fd` is the descriptor just opened,
        // closed once.
        unsafe {
            let fd = libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" moves the writing process.
            let written = libc::write(fd, c"0".as_ptr().cast(), 1);
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Signals every process in the cgroup: SIGKILL through `cgroup.kill` (which nothing in it
    /// escapes, not even a process forking at that moment), others one by one.
    pub(crate) fn signal(&self, signal: i32) {
        if signal == libc::SIGKILL {
            if let Err(error) = std::fs::write(self.path.join("cgroup.kill"), "1") {
                tracing::warn!(cgroup = %self.path.display(), %error, "cannot kill a task's cgroup");
            }
            return;
        }
        for pid in cgroup_pids(&self.path) {
            send(pid, signal);
        }
    }

    pub(crate) fn pids(&self) -> Vec<i32> {
        cgroup_pids(&self.path)
    }
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        // The kill is asynchronous: a cgroup still emptying is removed at a later drop (or by
        // the sentinel, with the worker's).
        let mut unremoved = UNREMOVED.lock().unwrap_or_else(|p| p.into_inner());
        unremoved.push(self.path.clone());
        unremoved.retain(|path| std::fs::remove_dir(path).is_err() && path.exists());
    }
}

/// The mark of one task's `Context::spawn` children: `CHIA_TASK_MARK=<nonce>.<n>`.
pub(crate) fn new_task_mark() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}.{}", NONCE.as_str(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Task marks of live tasks (that spawned something): their processes are never loose.
static LIVE_MARKS: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub(crate) fn mark_live(mark: &str) {
    let mut live = LIVE_MARKS.lock().unwrap_or_else(|p| p.into_inner());
    if !live.iter().any(|m| m == mark) {
        live.push(mark.to_string());
    }
}

pub(crate) fn mark_dead(mark: &str) {
    LIVE_MARKS.lock().unwrap_or_else(|p| p.into_inner()).retain(|m| m != mark);
}

/// Tasks, service instances and calls running on this worker, for the loose-process rule.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Counts something running on the worker while it lives; the last to end ends the loose
/// processes.
pub(crate) struct Activity(());

impl Activity {
    pub(crate) fn begin() -> Activity {
        ACTIVE.fetch_add(1, Ordering::AcqRel);
        Activity(())
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        if ACTIVE.fetch_sub(1, Ordering::AcqRel) == 1 {
            end_loose(libc::SIGKILL, "nothing else runs on the worker");
        }
    }
}

/// Whether one thing only (the caller) runs on this worker.
pub(crate) fn is_alone() -> bool {
    ACTIVE.load(Ordering::Acquire) <= 1
}

/// Signals the worker's loose processes (rule 3): in its cgroup, or started by it in the
/// fallback, and not a live task's. Does nothing without [`contain_worker`]: then the
/// process's other children are the user's. Returns the pids signalled.
pub(crate) fn end_loose(signal: i32, why: &str) -> Vec<i32> {
    let Some(contained) = CONTAINED.get() else { return Vec::new() };
    let me = own_pid();
    let signalled = match &contained.cgroup {
        Some(cgroup) => {
            let loose = cgroup.join("worker");
            let rounds = if signal == libc::SIGKILL { KILL_ROUNDS } else { 1 };
            let mut signalled = Vec::new();
            for _ in 0..rounds {
                let found: Vec<i32> = cgroup_pids(&loose).into_iter().filter(|&pid| pid != me).collect();
                if found.is_empty() {
                    break;
                }
                for &pid in &found {
                    send(pid, signal);
                }
                signalled.extend(found);
            }
            signalled
        }
        // A subreaper keeps every orphan of its tree as its own child: with no child but the
        // sentinel there is nothing loose, and the `/proc` scan (milliseconds, when the worker
        // goes idle after each task) is skipped.
        None if own_children()
            .is_some_and(|children| children.iter().all(|&pid| pid == contained.sentinel)) =>
        {
            Vec::new()
        }
        None => {
            let worker_mark = format!("{WORKER_MARK}={}", NONCE.as_str());
            let live: Vec<String> = LIVE_MARKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|m| format!("{TASK_MARK}={m}"))
                .collect();
            let descendants: HashSet<i32> = with_descendants(&[me]).into_iter().collect();
            kill_matching(signal, |p| {
                p.pid != contained.sentinel
                    && (descendants.contains(&p.pid) || environ_has(p.pid, &worker_mark))
                    && !live.iter().any(|mark| environ_has(p.pid, mark))
            })
        }
    };
    if !signalled.is_empty() {
        tracing::info!(count = signalled.len(), signal, why, "ended loose processes of the worker");
        if signal == libc::SIGKILL {
            reap(signalled.clone());
        }
    }
    signalled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_environment_entry_is_matched_not_a_prefix() {
        let mut child =
            std::process::Command::new("sleep").arg("30").env("CHIA_TEST_ENTRY", "abc.12").spawn().unwrap();
        let pid = child.id() as i32;
        // The entry is in place from exec on; wait until the child has exec'd.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !environ_has(pid, "CHIA_TEST_ENTRY=abc.12") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let whole = environ_has(pid, "CHIA_TEST_ENTRY=abc.12");
        let prefix = environ_has(pid, "CHIA_TEST_ENTRY=abc.1");
        let _ = child.kill();
        let _ = child.wait();
        assert!(whole);
        assert!(!prefix, "abc.1 must not match abc.12 (another task's mark)");
    }

    #[test]
    fn descendants_follow_the_process_tree() {
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(shell.stdout.take().unwrap()), &mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        let found = with_descendants(&[shell.id() as i32]);
        send(grandchild, libc::SIGKILL);
        let _ = shell.kill();
        let _ = shell.wait();
        assert!(found.contains(&grandchild), "{found:?} lacks {grandchild}");
    }
}
