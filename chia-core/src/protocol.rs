//! The wire protocol between the head and its peers (workers and drivers).
//!
//! Each QUIC connection carries one bidirectional control stream of frames. A frame is a
//! 4-byte big-endian length followed by that many bytes of MessagePack, encoded with field
//! names (`rmp_serde::to_vec_named`) so fields can be added without breaking older peers.
//! Frames longer than [`MAX_FRAME_BYTES`] are refused before anything is allocated. The first
//! frame a peer sends is [`PeerToHead::Hello`] with its [`PROTOCOL_VERSION`]; the head answers
//! [`HeadToPeer::Welcome`] or [`HeadToPeer::Rejected`] and acts on nothing before that.

use crate::error::TaskError;
use crate::function::FunctionKey;
use crate::ids::{NodeId, ServiceId, SessionId, TaskId};
use crate::inspect::{CancelTarget, Query};
use crate::placement::{GroupId, GroupSpec, Labels, Placement};
use crate::resources::Resources;
use crate::retries::Retries;
use serde::{Deserialize, Serialize};

/// Bumped whenever a change is not backwards compatible.
pub const PROTOCOL_VERSION: u32 = 6;

/// The largest frame either side accepts: it bounds task arguments and results too.
pub const MAX_FRAME_BYTES: usize = 512 << 20;

/// The bytes of a serialized value (a task argument or result).
pub type Value = Vec<u8>;

/// One argument of a call: a value, or the result of another task (the head substitutes it
/// when the task is dispatched, so values never go through the driver).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arg {
    /// The argument's encoded value, as the caller serialized it.
    Value(#[serde(with = "serde_bytes")] Value),
    /// The result of this task: the head holds the call until that task has succeeded (and
    /// fails it with `DependencyFailed` if it did not).
    Ref(TaskId),
}

/// A call as the driver submits it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The call's id, picked by the submitting session (its session bits are that session's).
    pub task: TaskId,
    /// The function to run, name and signature: only a node announcing both may run it.
    pub function: FunctionKey,
    /// The arguments, in the function's order.
    pub args: Vec<Arg>,
    /// Everything the task needs while it runs, `CPU` included.
    pub request: Resources,
    /// The caller's label for the call (`.tag("iter0")`), matched by cache, bypass and
    /// result-watch rules and shown by `chia list`; `None`: untagged.
    pub tag: Option<String>,
    /// How often the task may be re-run after its worker is lost (or, with
    /// `retry_exceptions`, after it fails). On the wire the original's integer, `-1` for
    /// without limit.
    pub max_retries: Retries,
    /// The caller decided to bypass this call: the worker runs this instead of the function.
    /// Boxed (most calls are not bypassed), so a submission — and every journal record and
    /// head action, which are as large as the largest message — stays small.
    #[serde(default)]
    pub bypass: Option<Box<BypassSpec>>,
    /// Re-run the task when it fails with an application error (`Err` or panic), while
    /// `max_retries` allows; otherwise only a lost worker makes it run again.
    #[serde(default)]
    pub retry_exceptions: bool,
    /// The job the call belongs to when it is made from inside another task (a nested call):
    /// the session of the driver that started the chain. `None`: the submitting session's own.
    #[serde(default)]
    pub job: Option<SessionId>,
    /// How long one attempt may run on its worker (milliseconds, more than 0) before it is
    /// cancelled with force and fails with `TimedOut`. `None`: as long as it takes.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Labels its node must have, how to pick among nodes, the placement-group bundle it runs
    /// in. `None` (most calls): anywhere it fits, as the scheduler picks. Boxed like `bypass`.
    #[serde(default)]
    pub placement: Option<Box<Placement>>,
}

/// What replaces a bypassed call on the worker: the named provider, or (without one) the
/// default provider, which returns the `data` file's contents read on the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BypassSpec {
    /// The registered provider to run; `None`: the default one, which returns the `data`
    /// file's contents.
    pub provider: Option<String>,
    /// The `data:` path of the function's bypass rule, passed to the provider.
    pub data: Option<String>,
}

/// Settings of a job that every task of it sees, nested calls included (today: its bypass
/// plan). Opaque to the head, which only stores and forwards them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSettings {
    /// The job: the session of the driver that set them.
    pub job: SessionId,
    /// Grows with every change, so a worker can keep the decoded settings of a revision.
    pub revision: u64,
    /// The settings as the runtime encoded them; the head never decodes them.
    #[serde(with = "serde_bytes")]
    pub settings: Value,
}

/// What a worker joining the cluster offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerOffer {
    /// What the node has in all for its tasks (the head adds `node:<name>` = 1); no name may
    /// start with `group:`, which placement groups use.
    pub resources: Resources,
    /// The functions linked into the worker, each with its signature hash.
    pub functions: Vec<FunctionKey>,
    /// Service types this worker can host (name = the type's name).
    #[serde(default)]
    pub services: Vec<FunctionKey>,
    /// This worker runs inside the head process and is the `head` node.
    #[serde(default)]
    pub head_node: bool,
    /// Labels calls can ask for (`--labels rack=a,fpga=vu9p`).
    #[serde(default)]
    pub labels: Labels,
}

/// A running service, as the head describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The id the head gave the instance; calls go by it, and a restarted instance keeps it.
    pub id: ServiceId,
    /// The name it was started under, unique within its namespace.
    pub name: String,
    /// The namespace its name belongs to.
    pub namespace: String,
    /// The service type's registered name.
    pub type_name: String,
    /// The service type's signature hash: a typed handle checks it on arrival.
    pub sig_hash: String,
    /// The node hosting it.
    pub node: String,
    /// Whether it outlives the session that started it ([`ServiceStart::detached`]).
    pub detached: bool,
}

/// A request to start a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStart {
    /// Answered like a task: `Done` with the [`ServiceInfo`], or the error.
    pub task: TaskId,
    /// The type to construct: only a node announcing it with this signature may host it.
    pub service_type: FunctionKey,
    /// The name to register it under: lookups and `get_if_exists` find it by it.
    pub name: String,
    /// The namespace the name belongs to (the same name may be used in another).
    pub namespace: String,
    /// Outlives the session that started it (until stopped or the cluster ends).
    pub detached: bool,
    /// A running service with the same name and type is returned instead of an error.
    pub get_if_exists: bool,
    /// What the instance holds on its node while it lives.
    pub request: Resources,
    /// The constructor's arguments, in order.
    pub args: Vec<Arg>,
    /// How often the head re-creates the instance on another node when its node is lost
    /// (on the wire `-1`: without limit; `0`: never). The new instance starts from its
    /// constructor.
    #[serde(default)]
    pub max_restarts: Retries,
    /// Labels its node must have, the placement-group bundle it lives in (its strategy is
    /// the scheduler's choice among nodes, as for a call).
    #[serde(default)]
    pub placement: Option<Box<Placement>>,
}

/// How a task ended, as a worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// It succeeded: the encoded result.
    Value(#[serde(with = "serde_bytes")] Value),
    /// It failed, was cancelled or timed out.
    Failed(TaskError),
}

/// How a task ended, as the head tells its owner. Large values stay on the head until
/// fetched, so a ref that is only passed on to other tasks never crosses to the driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Done {
    /// It succeeded: the encoded result, inline (small values, to a peer that keeps up).
    Value(#[serde(with = "serde_bytes")] Value),
    /// It succeeded and the head keeps the value: ask for it with [`PeerToHead::Fetch`].
    Stored {
        /// The value's size in bytes.
        len: u64,
    },
    /// It failed, was cancelled or timed out.
    Failed(TaskError),
}

/// What a peer (a driver, or a worker's connection, which is also a client) sends the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerToHead {
    /// The first message of a new session: the head answers [`HeadToPeer::Welcome`] or
    /// [`HeadToPeer::Rejected`].
    Hello {
        /// The peer's [`PROTOCOL_VERSION`]; any other than the head's is rejected.
        protocol_version: u32,
        /// The node name a worker asks for (another host's worker of that name makes the head
        /// add a suffix); a driver's is not used, it is named `driver-<session>`.
        name: String,
        /// What the peer offers as a worker; `None` for a driver.
        worker: Option<WorkerOffer>,
    },
    /// Instead of a hello, as a peer's first message to a head restarted from its journal:
    /// take up the session it had before (see [`ResumeSession`]).
    Resume(ResumeSession),
    /// A call to run; the head answers with [`HeadToPeer::Done`] when it ends (and
    /// [`HeadToPeer::Infeasible`] meanwhile if no node could ever run it).
    Submit(TaskSpec),
    /// Every `ObjectRef` to these tasks was dropped.
    Release {
        /// Tasks this session submitted (others are ignored); the head frees each result
        /// once no pending task needs it.
        tasks: Vec<TaskId>,
    },
    /// Send me this task's value.
    Fetch {
        /// A task whose result was announced as [`Done::Stored`].
        task: TaskId,
    },
    /// A worker finished a task it was given: `attempt` is the one its `Execute` named (0 for
    /// service instances and calls), so a report of an earlier attempt is told from the current.
    Finished {
        /// The task (or service start or call) it ran.
        task: TaskId,
        /// The attempt its `Execute` named (0 for service starts and calls).
        #[serde(default)]
        attempt: u32,
        /// How it ended (for a service call: the method's result).
        outcome: Outcome,
    },
    /// A worker took up attempt `attempt` of a task it was sent (it says so as the `Execute`
    /// arrives). Only an acknowledged attempt counts against `max_retries` when its node is
    /// lost: one sent to a worker that had died already is sent elsewhere for free.
    Started {
        /// The task it took up.
        task: TaskId,
        /// The attempt its `Execute` named.
        attempt: u32,
    },
    /// A running task is waiting for other tasks: its CPU may go to them.
    Blocked {
        /// The running task (on this worker) that waits.
        task: TaskId,
    },
    /// Answer with [`HeadToPeer::Pong`] (liveness and latency checks).
    Ping {
        /// Any number; the pong carries it back.
        nonce: u64,
    },
    /// Start (or, with `get_if_exists`, find) a named service; answered as `Done { task }`
    /// with its [`ServiceInfo`] once an instance is constructed.
    StartService(ServiceStart),
    /// Answered as `Done { task }` with an `Option<ServiceInfo>`.
    LookupService {
        /// The request's id, picked by the peer like a task's.
        task: TaskId,
        /// The service's name.
        name: String,
        /// The namespace the name is looked up in.
        namespace: String,
    },
    /// A method call; answered as `Done { task }` with the method's value.
    CallService {
        /// The call's id, picked by the peer: the call is a task record like any other.
        task: TaskId,
        /// The instance to call, from its handle.
        service: ServiceId,
        /// The service's name, for errors about a service that is gone.
        name: String,
        /// The method's name.
        method: String,
        /// The method's arguments (not the receiver), in order.
        args: Vec<Arg>,
    },
    /// Answered as `Done { task }` with `()`; stopping a service that is gone is not an error.
    StopService {
        /// The request's id, picked by the peer.
        task: TaskId,
        /// The instance to stop.
        service: ServiceId,
    },
    /// Sent by a service's constructor (`task` is the task constructing it): from now on,
    /// every successful task result that a rule matches is passed to `method(tag, value)` of
    /// that service, where the result lands (the cache's automatic write).
    WatchResults {
        /// The constructing task, which names the service (the head knows which it builds).
        task: TaskId,
        /// The method each matching result is passed to.
        method: String,
        /// Which results; one watch replaces any earlier one of that service.
        rules: Vec<WatchRule>,
    },
    /// A host dropped an instance it was told to stop (after its running calls ended), so
    /// what it held (files, ports) is free.
    InstanceStopped {
        /// The instance named by [`HeadToPeer::StopInstance`].
        service: ServiceId,
    },
    /// Replaces the settings of this session's job (`job` must be the session itself); the
    /// head sends them with every task of the job.
    SetJobSettings(JobSettings),
    /// Cancel a task this session submitted: dropped if it has not started, told to stop if it
    /// runs (`force`: its child processes are killed at once). It ends with `Cancelled`.
    Cancel {
        /// A task (or service call) this session submitted.
        task: TaskId,
        /// Kill its child processes at once rather than after a grace period.
        force: bool,
    },
    /// A worker is alive (sent every `heartbeat_ms` the head asked for in its welcome).
    Heartbeat,
    /// A heartbeat that also carries what the worker measured (sent every few heartbeats), so
    /// the head's metrics endpoint serves the whole cluster.
    Figures(WorkerFigures),
    /// A question about the cluster (any member may ask); answered as `Done { task }` with the
    /// encoded [`Answer`](crate::inspect::Answer). Changes nothing.
    Inspect {
        /// The request's id, picked by the peer.
        task: TaskId,
        /// The question.
        query: Query,
    },
    /// Cancel tasks whoever submitted them (the `chia cancel` command; members are trusted
    /// with the cluster's tasks); answered as `Done { task }` with the encoded
    /// [`Cancelled`](crate::inspect::Cancelled).
    CancelTasks {
        /// The request's id, picked by the peer.
        task: TaskId,
        /// A task, or every unfinished task of a job.
        target: CancelTarget,
        /// Kill the tasks' child processes at once rather than after a grace period.
        force: bool,
        /// With a job as the target: also stop the services it started that are not detached
        /// (`chia job stop`), once its last tasks are cancelled.
        #[serde(default)]
        stop_services: bool,
    },
    /// Create a placement group (`spec.group` is a task id of this session): answered as
    /// `Done { task: spec.group }` with `()` at once, or the error; the group is placed when
    /// its bundles fit (ask with [`PeerToHead::GroupReady`]).
    CreateGroup(GroupSpec),
    /// Answered as `Done { task }` once the group is placed, with the node name of each
    /// bundle (`Vec<String>`); or failed with `TaskError::PlacementGroup` when it cannot be
    /// placed on the connected nodes, is removed, or is unknown.
    GroupReady {
        /// The request's id, picked by the peer.
        task: TaskId,
        /// The group asked about.
        group: GroupId,
    },
    /// Remove a group: what it reserved is free again, calls queued in it fail and those
    /// running in it are cancelled. Answered as `Done { task }` with `()` (removing a group
    /// that is gone is not an error).
    RemoveGroup {
        /// The request's id, picked by the peer.
        task: TaskId,
        /// The group to remove.
        group: GroupId,
    },
}

/// What a worker measured of itself, sent with its heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerFigures {
    /// Resident memory of the worker process, in bytes (its task processes are not in it:
    /// counting them would mean walking `/proc` at every report).
    pub memory_bytes: u64,
    /// CPU time the worker process used, in milliseconds (its children's once they ended and
    /// were waited for).
    pub cpu_ms: u64,
    /// Tasks and service calls running on it now.
    pub running: u64,
    /// Attempts it has run since it started, and those that ran a bypass provider instead.
    pub attempts: u64,
    /// Of [`WorkerFigures::attempts`], those that ran a bypass provider.
    pub bypassed: u64,
    /// Figures of the services it hosts (the cache's hits, misses, bytes ...).
    #[serde(default)]
    pub services: Vec<ServiceFigure>,
}

/// One figure a hosted service reports: a counter or gauge named in Prometheus style
/// (`cache_hits_total`), for the service named `service`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFigure {
    /// The reporting service's name.
    pub service: String,
    /// The figure's Prometheus name (`cache_hits_total`).
    pub name: String,
    /// One line saying what it counts (Prometheus's `# HELP`).
    pub help: String,
    /// A counter (only grows while the service lives) rather than a gauge.
    pub counter: bool,
    /// Its current value.
    pub value: u64,
}

impl PeerToHead {
    /// The task of a request the head may answer at once from what it holds, leaving no task
    /// record behind: a lookup, a stop. After a head restart a peer sends such a request
    /// again while it is unanswered, since the answer may have died with the head (service
    /// starts go in [`ResumeSession::starts`] instead).
    pub fn repeatable_request(&self) -> Option<TaskId> {
        match self {
            PeerToHead::LookupService { task, .. }
            | PeerToHead::StopService { task, .. }
            | PeerToHead::Inspect { task, .. }
            | PeerToHead::GroupReady { task, .. }
            | PeerToHead::RemoveGroup { task, .. } => Some(*task),
            _ => None,
        }
    }
}

/// A peer takes up its session again after the head restarted from its journal (its welcome
/// named the journal). Everything the peer sent after the `resumed_through`-th frame of the
/// session (answered in the welcome) is sent again, so nothing that was in flight is lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeSession {
    /// The peer's [`PROTOCOL_VERSION`], checked as a hello's.
    pub protocol_version: u32,
    /// The session its welcome gave it.
    pub session: SessionId,
    /// The `journal_id` of the welcome that opened the session: a head that started afresh
    /// (another journal) does not know the session and refuses it.
    pub journal_id: u64,
    /// A worker's tasks it still runs or finished since it lost the head, with their
    /// attempts: a task the head had sent it that is not among them is sent again.
    #[serde(default)]
    pub known: Vec<TaskAttempt>,
    /// The tasks whose outcome the peer still waits for: those that ended meanwhile are
    /// announced again.
    #[serde(default)]
    pub waiting: Vec<TaskId>,
    /// The service starts still unanswered, as sent. The previous run may have answered one
    /// at once and kept no trace of it (refused, or joined to a running instance) and the
    /// answer died with it: the head decides again each one it has the frame of and knows
    /// nothing else of (the others come again with the frames after `resumed_through`).
    #[serde(default)]
    pub starts: Vec<UnansweredStart>,
}

/// A service start its peer still waits for the answer to, and the frame that carried it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnansweredStart {
    /// Its number among the session's frames (from 1).
    pub frame: u64,
    /// The start as the peer sent it.
    pub start: ServiceStart,
}

/// One run of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskAttempt {
    /// The task run.
    pub task: TaskId,
    /// Which run, as its `Execute` numbered it (from 1).
    pub attempt: u32,
}

/// Which results a service watches: a function's, for every call (`tags: None`) or for calls
/// whose tag one of the patterns matches in full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRule {
    /// The function's registered name.
    pub function: String,
    /// Whole-match regexes of the tags to watch; `None`: every call of the function, tagged
    /// or not.
    pub tags: Option<Vec<String>>,
}

/// Why a connection was closed, as its QUIC application close code: a peer told it was
/// replaced does not join again (it would only replace the one that replaced it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// It ended as asked (a peer leaving, the head shutting down or writing a session off).
    Ended,
    /// The peer opened no control stream or sent no hello in time.
    NoHello,
    /// The peer sent something that cannot be read.
    Unreadable,
    /// A worker of the same name joined from the same host: this one is taken to be its
    /// predecessor (restarted, or partitioned and given up), and is done.
    Replaced,
}

impl CloseCode {
    /// The code as sent in QUIC's application close.
    pub fn value(self) -> u32 {
        match self {
            CloseCode::Ended => 0,
            CloseCode::NoHello => 1,
            CloseCode::Unreadable => 2,
            CloseCode::Replaced => 3,
        }
    }

    /// The code a closed connection carried; `None` for one no `CloseCode` sends.
    pub fn from_value(value: u64) -> Option<CloseCode> {
        [CloseCode::Ended, CloseCode::NoHello, CloseCode::Unreadable, CloseCode::Replaced]
            .into_iter()
            .find(|code| u64::from(code.value()) == value)
    }
}

/// What the head sends a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadToPeer {
    /// The answer to an accepted [`PeerToHead::Hello`] or [`PeerToHead::Resume`].
    Welcome {
        /// The head's [`PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The peer's session: the high bits of every task id it picks.
        session: SessionId,
        /// The peer's node when it joined as a worker; `None` for a driver.
        node: Option<NodeId>,
        /// The name the head gave it: a worker's asked-for name (maybe with a suffix), `head`
        /// for the head's own node, `driver-<session>` for a driver.
        node_name: String,
        /// A worker sends [`PeerToHead::Heartbeat`] this often (milliseconds; 0: never). The
        /// head writes off a worker it has not heard from for a few of these.
        #[serde(default)]
        heartbeat_ms: u64,
        /// Set when the head keeps a journal: its id, which a peer names to take up its session
        /// after a head restart ([`PeerToHead::Resume`]).
        #[serde(default)]
        journal_id: Option<u64>,
        /// On a resumed session: how many frames of the session the head has; the peer sends
        /// again what it sent after them.
        #[serde(default)]
        resumed_through: u64,
        /// With a journal: how long a restarted head waits for the peer to take up its
        /// session (milliseconds), so the peer knows how long trying is worth it.
        #[serde(default)]
        resume_grace_ms: u64,
    },
    /// The answer to a first message the head refuses; it then closes the connection.
    Rejected {
        /// Why, in words (another protocol version, a malformed offer, ...).
        reason: String,
    },
    /// Run this task (to a worker). `attempt` counts its runs (1 for the first) and comes back
    /// in [`PeerToHead::Finished`].
    Execute {
        /// The task to run.
        task: TaskId,
        /// Which run this is, from 1.
        #[serde(default)]
        attempt: u32,
        /// The function's name (its signature was matched when the task was placed).
        function: String,
        /// The arguments in order, each a value: the head put in the results of `Ref`s.
        args: Vec<ArgValue>,
        /// The call's tag, as submitted.
        tag: Option<String>,
        /// What to run instead of the function when the caller bypassed the call.
        #[serde(default)]
        bypass: Option<BypassSpec>,
        /// The settings of the task's job, if its driver set any.
        #[serde(default)]
        job: Option<JobSettings>,
        /// The call's timeout (milliseconds): the worker stops the attempt this long after
        /// it started it and reports `TimedOut`.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// A task this session submitted ended.
    Done {
        /// The task (or request answered like one: a service start, a lookup, ...).
        task: TaskId,
        /// How it ended.
        done: Done,
    },
    /// No node connected now could ever run this task; it stays queued for one that can.
    Infeasible {
        /// A task this session submitted.
        task: TaskId,
        /// Why, in words (no node connected, none has the function, what nodes lack).
        reason: String,
    },
    /// Answer to [`PeerToHead::Fetch`].
    Fetched {
        /// The task asked for.
        task: TaskId,
        /// Its outcome; `None` when the head holds none (not ended, released, or unknown).
        outcome: Option<Outcome>,
    },
    /// Answer to [`PeerToHead::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The head's journal holds this session's messages up to the `through`-th: a peer need
    /// not keep them to send again after a head restart.
    Durable {
        /// A count of the session's frames, from its first.
        through: u64,
    },
    /// Construct a service instance (to its host). Its outcome is reported as `Finished { task }`.
    StartInstance {
        /// The task constructing it: the start's, or the head's own for a restart.
        task: TaskId,
        /// The id calls will name it by.
        service: ServiceId,
        /// The service type's registered name.
        type_name: String,
        /// The constructor's arguments, each a value.
        args: Vec<ArgValue>,
    },
    /// Run a method of an instance this host holds; reported as `Finished { task }`.
    CallInstance {
        /// The call's task, from [`PeerToHead::CallService`].
        task: TaskId,
        /// The instance to call.
        service: ServiceId,
        /// The method's name.
        method: String,
        /// The method's arguments, each a value.
        args: Vec<ArgValue>,
    },
    /// Drop an instance.
    StopInstance {
        /// The instance; the host answers [`PeerToHead::InstanceStopped`] once it is dropped.
        service: ServiceId,
    },
    /// Stop running `task` (to the worker running it): its context reports it cancelled and
    /// its child processes get SIGTERM, then SIGKILL after a grace period (at once if `force`).
    Cancel {
        /// A task (or service call) running on the worker.
        task: TaskId,
        /// Kill its child processes at once.
        force: bool,
    },
}

/// Borrowing twins of the [`HeadToPeer`] messages that carry values, so the head can send a
/// stored value without copying it first. Variants are encoded by name, so each encodes to
/// exactly the bytes of its owned twin and peers decode it as a [`HeadToPeer`].
#[derive(Clone, Debug, Serialize)]
pub enum HeadToPeerRef<'a> {
    /// [`HeadToPeer::Execute`], borrowed.
    Execute {
        /// See [`HeadToPeer::Execute`].
        task: TaskId,
        /// Which run this is, from 1.
        attempt: u32,
        /// The function's name.
        function: &'a str,
        /// The arguments in order, each a value.
        args: Vec<ValueRef<'a>>,
        /// The call's tag.
        tag: Option<&'a str>,
        /// What to run instead of the function, if bypassed.
        bypass: Option<&'a BypassSpec>,
        /// The settings of the task's job, if any.
        job: Option<JobSettingsRef<'a>>,
        /// The attempt's timeout in milliseconds; `None`: none.
        timeout_ms: Option<u64>,
    },
    /// [`HeadToPeer::Done`], borrowed.
    Done {
        /// The task that ended.
        task: TaskId,
        /// How it ended.
        done: DoneRef<'a>,
    },
    /// [`HeadToPeer::Fetched`], borrowed.
    Fetched {
        /// The task asked for.
        task: TaskId,
        /// Its outcome; `None` when the head holds none.
        outcome: Option<OutcomeRef<'a>>,
    },
    /// [`HeadToPeer::StartInstance`], borrowed.
    StartInstance {
        /// The task constructing it.
        task: TaskId,
        /// The id calls will name it by.
        service: ServiceId,
        /// The service type's registered name.
        type_name: &'a str,
        /// The constructor's arguments.
        args: Vec<ValueRef<'a>>,
    },
    /// [`HeadToPeer::CallInstance`], borrowed.
    CallInstance {
        /// The call's task.
        task: TaskId,
        /// The instance to call.
        service: ServiceId,
        /// The method's name.
        method: &'a str,
        /// The method's arguments.
        args: Vec<ValueRef<'a>>,
    },
}

/// The borrowed twin of [`JobSettings`].
#[derive(Clone, Copy, Debug, Serialize)]
pub struct JobSettingsRef<'a> {
    /// [`JobSettings::job`].
    pub job: SessionId,
    /// [`JobSettings::revision`].
    pub revision: u64,
    /// [`JobSettings::settings`].
    pub settings: ValueRef<'a>,
}

/// A borrowed [`Value`].
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(transparent)]
pub struct ValueRef<'a>(#[serde(with = "serde_bytes")] pub &'a [u8]);

/// The borrowed twin of [`Done`].
#[derive(Clone, Copy, Debug, Serialize)]
pub enum DoneRef<'a> {
    /// [`Done::Value`].
    Value(ValueRef<'a>),
    /// [`Done::Stored`].
    Stored {
        /// The value's size in bytes.
        len: u64,
    },
    /// [`Done::Failed`].
    Failed(&'a TaskError),
}

/// The borrowed twin of [`Outcome`].
#[derive(Clone, Copy, Debug, Serialize)]
pub enum OutcomeRef<'a> {
    /// [`Outcome::Value`].
    Value(ValueRef<'a>),
    /// [`Outcome::Failed`].
    Failed(&'a TaskError),
}

impl Outcome {
    /// Borrows it, to encode it as [`Outcome`] without copying the value.
    pub fn as_ref(&self) -> OutcomeRef<'_> {
        match self {
            Outcome::Value(value) => OutcomeRef::Value(ValueRef(value)),
            Outcome::Failed(error) => OutcomeRef::Failed(error),
        }
    }
}

/// An argument as the worker receives it: always a value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ArgValue(#[serde(with = "serde_bytes")] pub Value);

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A frame to send, or a received frame's length prefix, is over [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The frame's body length in bytes.
        len: usize,
        /// The limit, [`MAX_FRAME_BYTES`].
        max: usize,
    },
    /// A frame body is not MessagePack of the expected message.
    #[error("malformed message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    /// A message could not be serialized (a value that serde refuses).
    #[error("message could not be encoded: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// Encodes `message` as one frame (length prefix included) and appends it to `out`, so a
/// writer can batch many frames into one write.
pub fn encode_frame<M: Serialize>(message: &M, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = rmp_serde::encode::write_named(out, message) {
        out.truncate(start);
        return Err(e.into());
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(ProtocolError::FrameTooLarge { len, max: MAX_FRAME_BYTES });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Checks a frame's length prefix before its body is read.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::FrameTooLarge { len, max: MAX_FRAME_BYTES });
    }
    Ok(len)
}

/// Decodes one frame body.
pub fn decode_body<'de, M: Deserialize<'de>>(body: &'de [u8]) -> Result<M, ProtocolError> {
    Ok(rmp_serde::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_named_fields() {
        let msg = PeerToHead::Submit(TaskSpec {
            task: TaskId::new(SessionId(1), 2),
            function: FunctionKey::new("simple_add", "0123456789abcdef"),
            args: vec![Arg::Value(vec![1, 2, 3]), Arg::Ref(TaskId(9))],
            request: Resources::parse("adder=1,CPU=1").unwrap(),
            tag: Some("iter0".into()),
            max_retries: Retries::UpTo(3),
            retry_exceptions: true,
            bypass: Some(Box::new(BypassSpec { provider: Some("provider_42".into()), data: None })),
            job: Some(SessionId(4)),
            timeout_ms: Some(2500),
            placement: Some(Box::new(Placement {
                labels: Labels::parse("fpga=vu9p").unwrap(),
                ..Placement::default()
            })),
        });
        let mut out = Vec::new();
        encode_frame(&msg, &mut out).unwrap();
        let len = frame_len(out[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, out.len() - 4);
        // Field names travel, so a peer can add fields later.
        assert!(out.windows(b"max_retries".len()).any(|w| w == b"max_retries"));
        let back: PeerToHead = decode_body(&out[4..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn borrowed_messages_encode_as_their_owned_twins() {
        let error = TaskError::UnknownFunction { function: "f".into() };
        let value = vec![9u8; 300];
        let bypass = BypassSpec { provider: None, data: Some("/recorded/perf.md".into()) };
        let pairs: Vec<(HeadToPeerRef<'_>, HeadToPeer)> = vec![
            (
                HeadToPeerRef::Execute {
                    task: TaskId(1),
                    attempt: 2,
                    function: "f",
                    args: vec![ValueRef(&value), ValueRef(&[])],
                    tag: Some("iter0"),
                    bypass: Some(&bypass),
                    job: Some(JobSettingsRef { job: SessionId(3), revision: 2, settings: ValueRef(&value) }),
                    timeout_ms: Some(60_000),
                },
                HeadToPeer::Execute {
                    task: TaskId(1),
                    attempt: 2,
                    function: "f".into(),
                    args: vec![ArgValue(value.clone()), ArgValue(Vec::new())],
                    tag: Some("iter0".into()),
                    bypass: Some(bypass.clone()),
                    job: Some(JobSettings { job: SessionId(3), revision: 2, settings: value.clone() }),
                    timeout_ms: Some(60_000),
                },
            ),
            (
                HeadToPeerRef::Done { task: TaskId(2), done: DoneRef::Value(ValueRef(&value)) },
                HeadToPeer::Done { task: TaskId(2), done: Done::Value(value.clone()) },
            ),
            (
                HeadToPeerRef::Done { task: TaskId(3), done: DoneRef::Stored { len: 7 } },
                HeadToPeer::Done { task: TaskId(3), done: Done::Stored { len: 7 } },
            ),
            (
                HeadToPeerRef::Fetched { task: TaskId(4), outcome: Some(OutcomeRef::Failed(&error)) },
                HeadToPeer::Fetched { task: TaskId(4), outcome: Some(Outcome::Failed(error.clone())) },
            ),
            (
                HeadToPeerRef::Fetched { task: TaskId(5), outcome: None },
                HeadToPeer::Fetched { task: TaskId(5), outcome: None },
            ),
        ];
        for (borrowed, owned) in pairs {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            encode_frame(&borrowed, &mut a).unwrap();
            encode_frame(&owned, &mut b).unwrap();
            assert_eq!(a, b, "{owned:?}");
        }
    }

    #[test]
    fn a_submission_from_before_timeouts_has_none() {
        // What a peer (or a journal) from before `timeout_ms` and the other optional fields
        // sends: the same names, fewer of them.
        #[derive(Serialize)]
        struct EarlierTaskSpec {
            task: TaskId,
            function: FunctionKey,
            args: Vec<Arg>,
            request: Resources,
            tag: Option<String>,
            max_retries: i32,
        }
        let earlier = EarlierTaskSpec {
            task: TaskId(7),
            function: FunctionKey::new("f", "h"),
            args: Vec::new(),
            request: Resources::new(),
            tag: None,
            max_retries: 3,
        };
        let bytes = rmp_serde::to_vec_named(&earlier).unwrap();
        let spec: TaskSpec = decode_body(&bytes).unwrap();
        assert_eq!(spec.timeout_ms, None);
        assert_eq!(spec.placement, None);
        assert_eq!(spec.max_retries, Retries::UpTo(3));
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        assert!(matches!(frame_len((u32::MAX).to_be_bytes()), Err(ProtocolError::FrameTooLarge { .. })));
        assert!(matches!(decode_body::<PeerToHead>(&[0xc1, 0xff, 0x00]), Err(ProtocolError::Malformed(_))));
        assert!(matches!(decode_body::<PeerToHead>(b""), Err(ProtocolError::Malformed(_))));
    }
}
