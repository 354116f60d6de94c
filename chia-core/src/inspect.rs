//! Questions about the cluster and the head's answers: what `chia status`, `chia list`,
//! `chia show` and `chia explain` ask (as [`PeerToHead::Inspect`]) and print.
//!
//! The head answers from what it holds, with counts kept as things happen, so no answer walks
//! every task: a listing looks at no more records than [`TaskFilter::limit`] plus
//! [`SCAN_PER_PAGE`], and says where to go on ([`TaskPage::next`]). Times are ages in
//! milliseconds before the answer (the head's clock is monotonic, not a calendar).
//!
//! [`PeerToHead::Inspect`]: crate::protocol::PeerToHead::Inspect

use crate::ids::{ServiceId, SessionId, TaskId};
use crate::resources::Resources;
use serde::{Deserialize, Serialize};

/// The most task records one listing page examines (matching or not): a filter that matches
/// little returns a short page with [`TaskPage::next`] rather than holding the head's lock.
pub const SCAN_PER_PAGE: usize = 100_000;

/// The most tasks one page returns, whatever the caller asks for.
pub const MAX_PAGE: usize = 10_000;

/// Ended tasks the head remembers after it freed their records (for `chia show` and
/// `chia list --state finished`), newest kept.
pub const ENDED_TASKS_KEPT: usize = 10_000;

/// A question for the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The whole cluster in one answer ([`ClusterStatus`]).
    Status,
    /// Tasks, newest first.
    Tasks(TaskFilter),
    /// Every joined node, by name ([`NodeView`]s).
    Nodes,
    /// Every registered service, by namespace and name ([`ServiceView`]s).
    Services,
    /// Every connected driver but the asker ([`JobView`]s), newest first.
    Jobs,
    /// One task in detail ([`TaskView`] with its attempts).
    Task(TaskId),
    /// One service by name.
    Service {
        /// The name it was started under.
        name: String,
        /// The namespace of the name.
        namespace: String,
    },
    /// Why a task is not running ([`Explanation`]).
    Explain(TaskId),
}

/// The answer to a [`Query`], the variant of the same name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// To [`Query::Status`].
    Status(Box<ClusterStatus>),
    /// To [`Query::Tasks`]: one page.
    Tasks(TaskPage),
    /// To [`Query::Nodes`].
    Nodes(Vec<NodeView>),
    /// To [`Query::Services`].
    Services(Vec<ServiceView>),
    /// To [`Query::Jobs`].
    Jobs(Vec<JobView>),
    /// To [`Query::Task`]; `None` when the head neither holds the task's record nor
    /// remembers it among the ended ones.
    Task(Option<Box<TaskView>>),
    /// To [`Query::Service`]; `None` when no service has that name in that namespace.
    Service(Option<ServiceView>),
    /// To [`Query::Explain`].
    Explain(Explanation),
    /// The question could not be answered as asked (a tag pattern that is not a regex).
    Refused {
        /// What is wrong with the question.
        reason: String,
    },
}

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Some argument task has not finished yet.
    Waiting,
    /// Ready, waiting for a node with room.
    Queued,
    /// Sent to a node (or running there).
    Running,
    /// Ended with a value.
    Finished,
    /// Ended with an error other than a cancellation (a timeout, a lost worker included).
    Failed,
    /// Ended cancelled, by its owner or `chia cancel`.
    Cancelled,
}

impl TaskState {
    /// Every state, from waiting to the three ended ones.
    pub const ALL: [TaskState; 6] = [
        TaskState::Waiting,
        TaskState::Queued,
        TaskState::Running,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// Its name, as `--state` takes it and `--json` shows it (`queued`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Waiting => "waiting",
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Finished => "finished",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// Whether it is final: finished, failed or cancelled.
    pub fn has_ended(self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Failed | TaskState::Cancelled)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;

    fn from_str(text: &str) -> Result<TaskState, String> {
        TaskState::ALL.into_iter().find(|state| state.as_str() == text).ok_or_else(|| {
            let known: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown task state {text:?}; the states are {}", known.join(", "))
        })
    }
}

/// Which tasks a listing returns. Every field narrows it; empty means all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFilter {
    /// The state the task is in now.
    #[serde(default)]
    pub state: Option<TaskState>,
    /// The function's exact name.
    #[serde(default)]
    pub function: Option<String>,
    /// A regular expression the whole tag must match (as the cache's tag patterns).
    #[serde(default)]
    pub tag: Option<String>,
    /// The job (its driver's session).
    #[serde(default)]
    pub job: Option<SessionId>,
    /// The node a task runs on, or its last attempt ran on.
    #[serde(default)]
    pub node: Option<String>,
    /// At most this many tasks (0 is taken as 1; capped at [`MAX_PAGE`]).
    pub limit: usize,
    /// Go on from a previous page's [`TaskPage::next`].
    #[serde(default)]
    pub after: Option<u64>,
}

/// One page of a task listing, newest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskPage {
    /// The matching tasks, newest first, without their attempts.
    pub tasks: Vec<TaskView>,
    /// More may match: pass this as [`TaskFilter::after`] for the next page.
    pub next: Option<u64>,
}

/// A task as the head knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// The task's id.
    pub task: TaskId,
    /// The function's name (a service's constructor is `<Type>.new`).
    pub function: String,
    /// The call's tag, if it had one.
    pub tag: Option<String>,
    /// The job (its driver's session) and that driver's name while it is connected.
    pub job: SessionId,
    /// The driver's name; `None` once it is gone.
    pub job_name: Option<String>,
    /// Where it is now.
    pub state: TaskState,
    /// Milliseconds since it was submitted.
    pub submitted_ms_ago: u64,
    /// Where it runs, or where its last attempt ran.
    pub node: Option<String>,
    /// The caller bypassed it (the provider's name, or `data` for a `data:` file).
    pub bypassed: Option<String>,
    /// Bytes of its arguments given as values (refs are counted once their value is known).
    pub argument_bytes: u64,
    /// Bytes of its result, once it succeeded and while the head holds it.
    pub result_bytes: Option<u64>,
    /// The error text, if it failed.
    pub error: Option<String>,
    /// Runs so far, oldest first (filled by [`Query::Task`]; empty in listings).
    #[serde(default)]
    pub attempts: Vec<AttemptView>,
    /// The tasks it takes as arguments that have not finished yet.
    #[serde(default)]
    pub waiting_for: Vec<TaskId>,
}

/// One run of a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptView {
    /// Which run, from 1.
    pub attempt: u32,
    /// The node it was sent to.
    pub node: String,
    /// Milliseconds ago it was sent to the node.
    pub sent_ms_ago: u64,
    /// Milliseconds ago the node said it started it; `None` until it said so.
    pub started_ms_ago: Option<u64>,
    /// Milliseconds ago it ended; `None` while it runs.
    pub ended_ms_ago: Option<u64>,
    /// How it ended: `finished`, the error, `worker lost`; `None` while it runs.
    pub outcome: Option<String>,
}

/// The whole cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Milliseconds since the head started (after a restart: since it recovered).
    pub head_up_ms: u64,
    /// Every joined node, by name.
    pub nodes: Vec<NodeView>,
    /// Queued tasks grouped by what they need.
    pub demand: Vec<Demand>,
    /// Tasks held now, by state (ended ones while the head keeps their records).
    pub tasks: TaskCounts,
    /// Since the head started.
    pub totals: TaskTotals,
    /// Services registered now, whatever their state.
    pub services: usize,
    /// Connected drivers.
    pub jobs: usize,
    /// Bytes of task results the head holds.
    pub result_bytes: u64,
    /// Queued tasks that fit a node with room and the function and were not placed for longer
    /// than the watchdog's threshold (found by its last look).
    pub stuck: Vec<Stuck>,
}

/// Function tasks the head holds now, by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Waiting for argument tasks (or for the service they call).
    pub waiting: u64,
    /// Ready and waiting for a node with room (service instances being placed included).
    pub queued: u64,
    /// Sent to a node and not ended (service instances not counted).
    pub running: u64,
    /// Ended and still held (their results wait to be fetched or used).
    pub ended: u64,
}

/// Function tasks counted since the head started (after a restart: since it recovered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTotals {
    /// Tasks submitted.
    pub submitted: u64,
    /// Tasks that ended with a value.
    pub finished: u64,
    /// Tasks that ended with an error other than a cancellation.
    pub failed: u64,
    /// Tasks that ended cancelled, or were dropped unfinished with their driver.
    pub cancelled: u64,
    /// Runs started again after a lost worker or a retried error.
    pub retried: u64,
    /// Tasks submitted bypassed (counted in `submitted` too).
    pub bypassed: u64,
}

impl std::ops::AddAssign for TaskTotals {
    fn add_assign(&mut self, other: TaskTotals) {
        self.submitted += other.submitted;
        self.finished += other.finished;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.retried += other.retried;
        self.bypassed += other.bypassed;
    }
}

/// A joined worker node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// The node's name (`head` for the head's own).
    pub name: String,
    /// Where it connected from (`host:port`); `None` when the head was given no such
    /// address (an in-process connection, the simulator).
    pub address: Option<String>,
    /// Milliseconds since its session opened (after a head restart: since the recovery).
    pub up_ms: u64,
    /// Milliseconds since anything last arrived from it.
    pub last_heard_ms_ago: u64,
    /// What it offered, with its `node:<name>` affinity.
    pub total: Resources,
    /// What its tasks, service instances and group bundles hold now.
    pub used: Resources,
    /// What is left for tasks outside placement groups.
    pub free: Resources,
    /// Function tasks on it now (service instances not counted).
    pub running: u64,
    /// The functions it announced, by name, sorted.
    pub functions: Vec<String>,
    /// The service types it can host, by name, sorted.
    pub service_types: Vec<String>,
    /// Takes no new tasks: its worker has not come back after a head restart yet.
    pub paused: bool,
    /// What its worker reported with its latest heartbeat.
    #[serde(default)]
    pub figures: Option<crate::protocol::WorkerFigures>,
    /// The labels its worker offers (`--labels`).
    #[serde(default)]
    pub labels: crate::placement::Labels,
    /// Bundles of placement groups reserved on it (what they reserve is not in `free`).
    #[serde(default)]
    pub bundles: u64,
}

/// Queued tasks of one shape (the same function and request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// The function's name.
    pub function: String,
    /// What each of them requests.
    pub request: Resources,
    /// How many are queued.
    pub queued: u64,
    /// Milliseconds since the oldest of them was submitted.
    pub oldest_ms_ago: u64,
    /// No connected node could ever hold it, and why.
    pub infeasible: Option<String>,
}

/// Queued tasks the watchdog found not placed although a node had room for them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stuck {
    /// The function's name.
    pub function: String,
    /// What each of them requests.
    pub request: Resources,
    /// How many are queued.
    pub queued: u64,
    /// Milliseconds since the oldest of them was submitted.
    pub oldest_ms_ago: u64,
    /// A node that has the function and the free resources.
    pub fits_on: String,
}

/// A registered service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Its id (kept across restarts of its instance).
    pub id: ServiceId,
    /// The name it was started under.
    pub name: String,
    /// The namespace of its name.
    pub namespace: String,
    /// The service type's name.
    pub type_name: String,
    /// Hosting node; `None` while it is being placed (or placed again).
    pub node: Option<String>,
    /// Whether it outlives the session that started it.
    pub detached: bool,
    /// `starting`, `running`, `restarting` (its node was lost; a new instance is being
    /// placed) or `stopping`.
    pub state: String,
    /// The name of the session that started it (a driver, or the node whose task did);
    /// `None` once that session is gone.
    pub owner: Option<String>,
}

/// A job: a connected driver and the tasks it submitted (nested calls included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    /// The job: its driver's session.
    pub job: SessionId,
    /// The driver's name (`driver-<session>`).
    pub name: String,
    /// Milliseconds since the driver connected (after a head restart: since the recovery).
    pub up_ms: u64,
    /// Tasks of it the head holds that have not ended.
    pub unfinished: u64,
    /// Function tasks submitted in it since the head started.
    pub submitted: u64,
}

/// Why a task is where it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// The task asked about.
    pub task: TaskId,
    /// Where it is; `None` when the head knows nothing of it.
    pub state: Option<TaskState>,
    /// Each reason that applies: for a queued task, one per node with the function (at most
    /// 20) and how many tasks are ahead of it; otherwise the state's own.
    pub reasons: Vec<Reason>,
}

/// One reason a task is not running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The head holds no record of it (never submitted, or ended and forgotten).
    Unknown,
    /// It runs: on this node, attempt N.
    Running {
        /// The node's name.
        node: String,
        /// The attempt running.
        attempt: u32,
    },
    /// It ended.
    Ended {
        /// How: finished, failed or cancelled.
        state: TaskState,
        /// The error's text; `None` when it finished.
        error: Option<String>,
    },
    /// Its argument tasks have not finished.
    WaitingFor {
        /// The argument tasks not finished yet.
        tasks: Vec<TaskId>,
    },
    /// A service call waiting for its service to be placed.
    WaitingForService {
        /// The service's name.
        service: String,
    },
    /// No connected node offers the function.
    NoNodeOffers {
        /// The function's name.
        function: String,
    },
    /// Nodes offer the function with another signature (other binaries).
    SignatureDiffers {
        /// The function's name.
        function: String,
        /// The signature hash the call has.
        wanted: String,
        /// The signature hashes connected nodes offer under that name.
        offered: Vec<String>,
    },
    /// A node has the function but could never hold the request: what it lacks.
    NeverFits {
        /// The node's name.
        node: String,
        /// Each resource it has too little of in all.
        short: Vec<Shortfall>,
    },
    /// A node could hold it, but not now: what is in use.
    Busy {
        /// The node's name.
        node: String,
        /// Each resource it has too little of free now.
        short: Vec<Shortfall>,
    },
    /// A node takes no new tasks (waiting for its worker after a head restart).
    Paused {
        /// The node's name.
        node: String,
    },
    /// Older tasks of its shape are ahead of it.
    Behind {
        /// How many queued tasks of its shape go first.
        queued_ahead: u64,
    },
    /// A node fits it now and the function is there, yet it is not placed (the watchdog's case).
    FitsNow {
        /// The node's name.
        node: String,
    },
    /// A node has the function but not the labels the call asks for: each missing one, as
    /// `key=value (has key=other)` or `key=value (has none)`.
    LabelsDiffer {
        /// The node's name.
        node: String,
        /// The labels it lacks, as above.
        missing: Vec<String>,
    },
    /// Its placement group's bundle is not reserved yet; `infeasible`: why the connected
    /// nodes could never hold the group, if they could not.
    WaitingForGroup {
        /// The group, as displayed (`group-3.7`).
        group: String,
        /// Why the connected nodes could never hold it; `None` while they might.
        infeasible: Option<String>,
    },
}

/// A resource a node does not have enough of for a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    /// The resource's name.
    pub resource: String,
    /// The amount the task requests, as a decimal (`2.5`).
    pub requested: String,
    /// What the node has: in all ([`Reason::NeverFits`]) or free now ([`Reason::Busy`]).
    pub available: String,
}

/// Which tasks a [`PeerToHead::CancelTasks`](crate::protocol::PeerToHead::CancelTasks) stops.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelTarget {
    /// This task, whoever submitted it.
    Task(TaskId),
    /// Every unfinished task of the job.
    Job(SessionId),
}

/// What a cancellation did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    /// Tasks that were cancelled (dropped from the queue, or told to stop).
    pub tasks: Vec<TaskId>,
    /// Tasks the target named that had ended already.
    pub already_ended: u64,
    /// A job had more unfinished tasks than one request cancels: ask again.
    #[serde(default)]
    pub more: bool,
    /// The services stopped with the job (`stop_services`), by name.
    #[serde(default)]
    pub services: Vec<String>,
}
