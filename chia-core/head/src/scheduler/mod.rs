//! The head's scheduler: which task runs on which node, and when.
//!
//! It owns everything placement needs: the dependency graph of submitted tasks (readiness and
//! failure propagation), each node's resources and announced functions, and the queues of ready
//! tasks. It does no I/O and reads no clock. Like quinn-proto or HyperQueue's reactor, the head
//! feeds it [`Event`]s with the current time and carries out the [`Command`]s it queues (lease a
//! task to a worker, tell a driver its task can never run, log that a task fits nowhere yet), so
//! every decision is deterministic and testable without sockets or threads.
//!
//! Placement works on *shapes*: ready tasks with the same function and request wait in one FIFO
//! queue, and each shape keeps the list of live nodes that could ever hold it. After every event
//! one invariant holds: **a shape with queued tasks fits on none of its nodes right now.** So an
//! event only has to look where it changed something: a task that becomes ready tries its own
//! shape (and only if nothing of that shape is already waiting), resources freed on a node are
//! offered to that node's shapes, oldest waiting task first, and a node that joins is offered
//! everything it can run. No pass rescans queued tasks that cannot fit, and a task that fits
//! nowhere never holds back smaller tasks queued behind it.
//!
//! Failures: a node that is lost (it disconnected, or [`Scheduler::expire_silent`] found it
//! silent) takes its resources with it, and each task it ran goes back to the front of its
//! shape's queue while it has attempts left (`max_retries`), else fails with
//! [`TaskError::WorkerLost`]. Only an attempt the node acknowledged ([`Event::TaskStarted`])
//! counts: one sent to a worker that had died already costs a task that may be retried
//! nothing (up to [`UNACKNOWLEDGED_LOSSES`] of them, so a task that kills its worker before it
//! can say so still ends; a task that may not be retried is never sent twice); a task may ask for application errors to be retried the same
//! way. Only the node a task is leased to may end it: a report from an earlier attempt's node
//! is stale and ignored. A cancelled task that runs is asked to stop and ends
//! [`TaskError::Cancelled`] whatever happens next; one that has not started ends at once.

mod groups;
mod index;
mod overview;
mod pool;
#[cfg(test)]
mod tests;

use chia_core::placement::{GroupId, GroupSpec, Labels, Placement, Strategy};
use chia_core::resources::NODE_PREFIX;
use chia_core::{FunctionKey, NodeId, ResourceAmount, Resources, Retries, SessionId, TaskError, TaskId};
use index::{FunctionSlot, GroupSlot, IndexVec, NodeSlot, ShapeSlot, Slab, TaskSlot};
use pool::{Names, Need, Pool, TaskIndex};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

pub use groups::GroupStatus;
pub use overview::{NodeOverview, ShapeOverview, StateCounts};

/// Something that happened, as the head tells the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A worker connected. It advertises `resources` (plus `node:<name>` = 1, added here) and
    /// `labels`, and can run exactly the `functions` it announced.
    NodeJoined {
        /// The id the head gave it.
        node: NodeId,
        /// Its name (the affinity resource is `node:<name>`): unique, but for the moment a
        /// successor that took its predecessor's name joins before the predecessor is lost.
        name: String,
        /// What it offers in all; `node:<name>` = 1 is added unless it is there already.
        resources: Resources,
        /// Functions and service types (`service:<Type>`) it can run, with their signatures.
        functions: Vec<FunctionKey>,
        /// The labels its worker offers.
        #[serde(default)]
        labels: Labels,
        /// It joins paused (as after [`Event::NodePaused`]) and takes nothing until
        /// [`Event::NodeResumed`]: a worker replacing its predecessor joins so, so that what
        /// the predecessor ran is queued again before the successor is filled.
        #[serde(default)]
        paused: bool,
    },
    /// A worker disconnected; it and what ran there are lost. Its tasks run again elsewhere
    /// while they have attempts left.
    NodeLost {
        /// The node lost.
        node: NodeId,
    },
    /// The head heard from `node` (any frame or a ping) at the event's time; see
    /// [`Scheduler::expire_silent`].
    NodeHeard {
        /// The node heard from.
        node: NodeId,
    },
    /// Nothing new is placed on `node` until [`Event::NodeResumed`]: its worker has not come
    /// back after a head restart and may never (what it runs stays leased there).
    NodePaused {
        /// The node to pause.
        node: NodeId,
    },
    /// `node` takes tasks again: it is offered what is queued that it can run.
    NodeResumed {
        /// The node whose worker is back.
        node: NodeId,
    },
    /// A session asks for `function` to run with `request` held, once every task in `deps` has
    /// finished successfully. If its node is lost, it runs again while `max_retries` allows;
    /// with `retry_exceptions`, so does an [`TaskError::Application`] error, a run stopped by
    /// its timeout ([`TaskError::TimedOut`]) or a failed setup hook
    /// ([`TaskError::SetupFailed`]).
    TaskSubmitted {
        /// The task's id (its session bits name the session it belongs to).
        task: TaskId,
        /// The function, name and signature: only nodes announcing both can run it.
        function: FunctionKey,
        /// What it holds on its node while it runs.
        request: Resources,
        /// The tasks whose results it takes as arguments.
        deps: Vec<TaskId>,
        /// How often it may run again after a lost node (or a retried error).
        max_retries: Retries,
        /// Whether application errors, timeouts and failed setup hooks are retried too.
        retry_exceptions: bool,
        /// Labels its node must have, how to pick among nodes, its group's bundle (`None`: a
        /// plain task, placed as before).
        #[serde(default)]
        placement: Option<Box<Placement>>,
    },
    /// `node` took up the attempt of `task` it was sent: from now on the attempt counts
    /// against `max_retries` if the node is lost. Ignored unless the task is leased to `node`.
    TaskStarted {
        /// The task taken up.
        task: TaskId,
        /// The node that says so.
        node: NodeId,
    },
    /// `node` reports that `task` ended: `error` is `None` on success. Ignored unless the task
    /// is leased to `node` right now.
    TaskFinished {
        /// The task that ended.
        task: TaskId,
        /// The node that reports it.
        node: NodeId,
        /// Why it failed; `None`: it succeeded.
        error: Option<TaskError>,
    },
    /// Someone asked for `task` to be cancelled: it fails with [`TaskError::Cancelled`] at once
    /// if it has not started, and its node is told to stop it if it runs (`force`: without
    /// waiting for it to reach a point where it can stop cleanly).
    TaskCancelled {
        /// The task to cancel.
        task: TaskId,
        /// Stop it at once if it runs.
        force: bool,
    },
    /// The running task waits on other tasks (a nested get): its CPU is given back so the tasks it
    /// waits on can run. It is not re-acquired; at finish only what is still held is returned.
    TaskBlocked {
        /// The running task that waits.
        task: TaskId,
    },
    /// The head freed this task's result: the scheduler may forget it, and later submissions that
    /// depend on it fail with [`TaskError::UnknownDependency`].
    TaskForgotten {
        /// The task whose result is gone.
        task: TaskId,
    },
    /// The session that submitted tasks went away: its tasks that have not started are dropped
    /// (silently, nobody is left to tell). Running ones finish normally. The placement groups
    /// of its job that are not detached are removed.
    SessionClosed {
        /// The session that went away.
        session: SessionId,
    },
    /// A placement group of `owner`'s job is created; its bundles are reserved as soon as
    /// they fit ([`Command::GroupPlaced`]).
    GroupCreated {
        /// The group as requested (the head checked it with [`GroupSpec::validate`]).
        spec: GroupSpec,
        /// The session whose job it belongs to: the creator's, or the job it named.
        owner: SessionId,
    },
    /// A placement group is removed: see [`Command::GroupRemoved`].
    GroupRemoved {
        /// The group to remove.
        group: GroupId,
    },
}

/// Functions whose names start with this place service instances (see `head::services`);
/// a node that offers only those does not run tasks.
pub const SERVICE_FUNCTION_PREFIX: &str = "service:";

/// Something the head must do, in the order the scheduler decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Lease `task` to `node`; its requested resources are now held there. `attempt` counts
    /// the task's runs, 1 for the first.
    Dispatch {
        /// The task to send.
        task: TaskId,
        /// The node it is leased to.
        node: NodeId,
        /// Which run this is.
        attempt: u32,
    },
    /// The task will never run; tell its owner.
    Fail {
        /// The task that failed.
        task: TaskId,
        /// Why (a lost worker with no attempts left, a failed dependency, no such function ...).
        error: TaskError,
    },
    /// No connected node could ever run the task now. Reported once per task until it becomes
    /// feasible and infeasible again; the task stays queued in case a capable node joins.
    Infeasible {
        /// The task that cannot run now.
        task: TaskId,
        /// What the nodes lack, in words.
        reason: String,
    },
    /// Ask `node`, which runs `task`, to stop it (`force`: at once). The task ends cancelled
    /// when the node reports it or is lost, so its resources stay held until then.
    Cancel {
        /// The running task.
        task: TaskId,
        /// The node it runs on.
        node: NodeId,
        /// Kill its processes at once.
        force: bool,
    },
    /// `node` was silent too long and is lost now (its tasks are handled as for
    /// [`Event::NodeLost`]); close its connection.
    NodeExpired {
        /// The node written off.
        node: NodeId,
    },
    /// Every bundle of the group is reserved: on these nodes (by name), in bundle order.
    GroupPlaced {
        /// The group placed.
        group: GroupId,
        /// The node name of each bundle, in bundle order.
        nodes: Vec<String>,
    },
    /// The connected nodes could never hold the group as its strategy asks; it stays pending.
    /// Reported once until it becomes feasible and infeasible again.
    GroupInfeasible {
        /// The group that cannot be placed now.
        group: GroupId,
        /// Why, in words.
        reason: String,
    },
    /// The group is gone, with its reservations: its queued tasks failed, its running ones
    /// were asked to stop (with force).
    GroupRemoved {
        /// The group removed.
        group: GroupId,
    },
}

/// Where a task is, as far as the scheduler knows (for tests and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    /// Some dependency has not finished yet.
    Waiting,
    /// Ready, waiting for a node with room.
    Queued,
    /// Leased to `node`.
    Running {
        /// The node it runs on.
        node: NodeId,
    },
    /// Ended successfully.
    Finished,
    /// Ended with an error, or never ran.
    Failed,
}

/// The head's scheduler; see the module documentation. It is kept in a snapshot whole but
/// for what lives only during one event and the times nodes were heard (a restored head
/// hears every node at the restore).
#[derive(Serialize, Deserialize)]
pub struct Scheduler {
    names: Names,
    nodes: Slab<NodeSlot, Node>,
    node_index: HashMap<NodeId, NodeSlot>,
    functions: IndexVec<FunctionSlot, Function>,
    function_index: HashMap<FunctionKey, FunctionSlot>,
    functions_by_name: HashMap<String, Vec<FunctionSlot>>,
    shapes: Slab<ShapeSlot, Shape>,
    shape_index: HashMap<ShapeKey, ShapeSlot>,
    /// The shape of the latest submission: a burst of identical submissions skips interning.
    last_shape: Option<ShapeSlot>,
    /// Tasks live in a slab and refer to each other by slot, so only an event's own task id
    /// is ever looked up.
    tasks: Slab<TaskSlot, Task>,
    task_index: TaskIndex,
    /// Submission counter: orders tasks across shapes, and tells a task from a later one that
    /// reuses its slot or id.
    next_seq: u64,
    /// Live entries over all shape queues.
    queued: usize,
    /// Tasks waiting for their dependencies (counted as they move; again after a restore).
    #[serde(skip)]
    waiting: usize,
    /// The nodes runs of unfinished tasks were lost with, oldest first (for the error that
    /// ends a task out of retries); kept beside the tasks, which stay small.
    #[serde(default)]
    lost_on: HashMap<TaskId, Vec<String>>,
    #[serde(skip)]
    commands: Vec<Command>,
    /// Slots of tasks whose dependencies all finished during the current event, placed at its end.
    #[serde(skip)]
    ready: Vec<TaskSlot>,
    /// Reused by [`Scheduler::fill_node`] and [`Scheduler::place`] so a pass does not allocate.
    #[serde(skip)]
    heap: BinaryHeap<Reverse<(u64, ShapeSlot)>>,
    #[serde(skip)]
    last_event: Option<Instant>,
    /// Ends of the list of nodes by the time they were last heard (see [`Node::older`]):
    /// `None` when no node is connected.
    oldest_heard: Option<NodeSlot>,
    newest_heard: Option<NodeSlot>,
    /// Placement groups, and the pending ones oldest first (see `groups`).
    #[serde(default)]
    groups: Slab<GroupSlot, groups::Group>,
    #[serde(default)]
    group_index: HashMap<GroupId, GroupSlot>,
    #[serde(default)]
    pending_groups: Vec<GroupSlot>,
    /// Numbers the resources of the next group's bundles.
    #[serde(default)]
    next_group: u64,
}

/// Dispatches a task may lose with their node before the node acknowledged them and still be
/// sent again for free; past it, such a loss counts like a run (a task whose worker dies as
/// it arrives, every time, still ends).
pub const UNACKNOWLEDGED_LOSSES: u8 = 8;

/// [`Task::max_attempts`] of a task that may run again without limit.
const UNLIMITED: u32 = u32::MAX;

#[derive(Serialize, Deserialize)]
struct Node {
    id: NodeId,
    name: String,
    /// As advertised (plus `node:<name>`), for messages.
    capacity: Resources,
    pool: Pool,
    /// Interned functions it announced, sorted.
    functions: Vec<FunctionSlot>,
    /// Shapes this node could hold when idle (it has the function and the capacity).
    shapes: Vec<ShapeSlot>,
    /// Slots of the tasks leased here; each knows its position, so removal is O(1).
    running: Vec<TaskSlot>,
    /// When the head last heard from it (or when it joined).
    #[serde(skip, default = "crate::snapshot::restored_at")]
    heard: Instant,
    /// It takes no new tasks ([`Event::NodePaused`]): to placement it has no room.
    #[serde(default)]
    paused: bool,
    /// Neighbours in the list of nodes ordered by `heard`, oldest first: hearing from a node
    /// moves it to the end, so finding the silent ones only looks at the front. `None` at the
    /// ends: an `Option<NodeSlot>` costs a word more per node, off the hot path.
    older: Option<NodeSlot>,
    newer: Option<NodeSlot>,
    /// As offered; tasks asking for labels run only where all of theirs match.
    #[serde(default)]
    labels: Labels,
    /// The bundles of placement groups reserved here: `(group, bundle)`.
    #[serde(default)]
    bundles: Vec<(GroupSlot, u32)>,
}

impl Node {
    /// Whether tasks of `key`'s shape could run here when it is idle (its function aside).
    fn can_host(&self, key: &ShapeKey) -> bool {
        self.pool.could_hold(&key.need)
            && key.placement.as_ref().is_none_or(|p| self.labels.satisfy(&p.labels))
    }
}

#[derive(Serialize, Deserialize)]
struct Function {
    key: FunctionKey,
    /// Live nodes that announced it.
    nodes: Vec<NodeSlot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct ShapeKey {
    function: FunctionSlot,
    need: Need,
    /// Labels, strategy and group bundle; `None` for plain tasks, which pay nothing for them.
    #[serde(default)]
    placement: Option<Box<Placement>>,
}

/// Tasks with the same function and request, which are interchangeable for placement.
#[derive(Serialize, Deserialize)]
struct Shape {
    key: ShapeKey,
    /// As submitted, for messages.
    request: Resources,
    /// The CPU part of `key.need`, given back when a task blocks.
    cpu: u64,
    /// `(seq, slot)` of ready tasks, oldest first. Entries of dropped tasks are skipped lazily.
    queue: VecDeque<(u64, TaskSlot)>,
    /// Live entries in `queue`.
    queued: usize,
    /// Live nodes that could hold it when idle; empty means infeasible.
    capable: Vec<NodeSlot>,
    /// Round-robin position in `capable`, so a fan-out spreads over nodes.
    cursor: usize,
    /// Unfinished tasks of this shape; at zero the shape is removed, so one-off requests do
    /// not pile up.
    refs: usize,
}

#[derive(Serialize, Deserialize)]
struct Task {
    id: TaskId,
    seq: u64,
    state: State,
    dependents: Dependents,
    /// Times it was dispatched (the attempt number its node is sent).
    attempts: u32,
    /// Attempts that really ran: acknowledged by their node, or reported finished. Missing
    /// from a snapshot of a head that did not count them: then every dispatch counts
    /// ([`Scheduler::fill_in_older_snapshot`]).
    #[serde(default = "runs_not_counted")]
    runs: u32,
    /// Runs allowed in all (`max_retries + 1`), or [`UNLIMITED`].
    max_attempts: u32,
    /// Dispatches lost with their node before it acknowledged them.
    #[serde(default)]
    unacknowledged_losses: u8,
    /// An application error (or a timeout) runs it again too, while attempts remain.
    retry_exceptions: bool,
    /// The head released it: remove it once it ends, and treat it as unknown to new dependents.
    forgotten: bool,
}

impl Task {
    fn attempts_left(&self) -> bool {
        self.max_attempts == UNLIMITED || self.runs < self.max_attempts
    }
}

/// What a task may do after a failed attempt, as submitted.
#[derive(Clone, Copy)]
struct Retry {
    max_attempts: u32,
    exceptions: bool,
}

impl Retry {
    fn new(max_retries: Retries, exceptions: bool) -> Retry {
        // `UpTo(u32::MAX)` saturates to the same count as without limit: as good as forever.
        let max_attempts = max_retries.total_runs().unwrap_or(UNLIMITED);
        Retry { max_attempts, exceptions }
    }
}

fn acknowledged() -> bool {
    true
}

/// Read as "not counted" (no task can run this often) and replaced at once.
fn runs_not_counted() -> u32 {
    u32::MAX
}

/// Whether a running task's node was asked to cancel it, and how firmly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Cancel {
    No,
    Asked,
    Forced,
}

#[derive(Serialize, Deserialize)]
enum State {
    Waiting {
        shape: ShapeSlot,
        missing: usize,
    },
    Queued {
        shape: ShapeSlot,
    },
    /// `pos` is the task's index in its node's `running`; `started`: the node acknowledged
    /// the attempt (a snapshot from before acknowledgements counts every run as started).
    Running {
        shape: ShapeSlot,
        node: NodeSlot,
        pos: u32,
        cpu_released: bool,
        cancel: Cancel,
        #[serde(default = "acknowledged")]
        started: bool,
    },
    Finished,
    Failed(Box<TaskError>),
}

impl State {
    /// The shape of an unfinished task; `None` once it ended.
    fn shape(&self) -> Option<ShapeSlot> {
        match *self {
            State::Waiting { shape, .. } | State::Queued { shape } | State::Running { shape, .. } => {
                Some(shape)
            }
            State::Finished | State::Failed(_) => None,
        }
    }
}

/// `(slot, seq)` of unfinished tasks waiting on a task. Boxed, as most tasks have none: a smaller
/// [`Task`] is less memory to touch per task.
#[derive(Default, Serialize, Deserialize)]
#[allow(
    clippy::box_collection,
    reason = "8 bytes per task instead of 24; an allocation only for tasks with dependents"
)]
struct Dependents(Option<Box<Vec<(TaskSlot, u64)>>>);

impl Dependents {
    fn push(&mut self, dependent: (TaskSlot, u64)) {
        self.0.get_or_insert_default().push(dependent);
    }

    fn take(&mut self) -> Vec<(TaskSlot, u64)> {
        self.0.take().map_or_else(Vec::new, |dependents| *dependents)
    }
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new()
    }
}

impl Scheduler {
    /// A scheduler with no nodes, functions or tasks.
    pub fn new() -> Scheduler {
        Scheduler {
            names: Names::new(),
            nodes: Slab::default(),
            node_index: HashMap::new(),
            functions: IndexVec::default(),
            function_index: HashMap::new(),
            functions_by_name: HashMap::new(),
            shapes: Slab::default(),
            shape_index: HashMap::new(),
            last_shape: None,
            tasks: Slab::default(),
            task_index: TaskIndex::default(),
            next_seq: 0,
            queued: 0,
            waiting: 0,
            lost_on: HashMap::new(),
            commands: Vec::new(),
            ready: Vec::new(),
            heap: BinaryHeap::new(),
            last_event: None,
            oldest_heard: None,
            newest_heard: None,
            groups: Slab::default(),
            group_index: HashMap::new(),
            pending_groups: Vec::new(),
            next_group: 0,
        }
    }

    /// Applies one event; the commands it produces are queued for [`Scheduler::drain_commands`].
    /// Nothing a peer can send makes this panic: unknown or duplicate ids are ignored.
    pub fn handle(&mut self, now: Instant, event: Event) {
        self.last_event = Some(now);
        match event {
            Event::NodeJoined { node, name, resources, functions, labels, paused } => {
                self.node_joined(now, node, name, resources, functions, labels);
                if paused {
                    self.set_paused(node, true);
                } else {
                    self.offer_joined(node);
                }
            }
            Event::NodeLost { node } => self.nodes_lost(&[node]),
            Event::NodeHeard { node } => self.node_heard(node, now),
            Event::NodePaused { node } => self.set_paused(node, true),
            Event::NodeResumed { node } => self.set_paused(node, false),
            Event::TaskSubmitted {
                task,
                function,
                request,
                deps,
                max_retries,
                retry_exceptions,
                placement,
            } => self.submit(
                task,
                function,
                request,
                &deps,
                Retry::new(max_retries, retry_exceptions),
                placement,
            ),
            Event::TaskStarted { task, node } => self.task_started(task, node),
            Event::TaskFinished { task, node, error } => self.task_finished(task, node, error),
            Event::TaskCancelled { task, force } => self.task_cancelled(task, force),
            Event::TaskBlocked { task } => self.task_blocked(task),
            Event::TaskForgotten { task } => self.task_forgotten(task),
            Event::SessionClosed { session } => self.session_closed(session),
            Event::GroupCreated { spec, owner } => self.group_created(spec, owner),
            Event::GroupRemoved { group } => self.group_removed(group),
        }
    }

    /// Declares every node not heard from for `timeout` or longer at `now` lost, as if
    /// [`Event::NodeLost`] came for all of them at once, and queues [`Command::NodeExpired`] for
    /// each before the commands their loss produces. Looks only at the nodes it expires and
    /// one more.
    pub fn expire_silent(&mut self, now: Instant, timeout: Duration) {
        let silent = self.silent_nodes(now, timeout);
        self.commands.extend(silent.iter().map(|&node| Command::NodeExpired { node }));
        if !silent.is_empty() {
            self.nodes_lost(&silent);
        }
    }

    /// The nodes not heard from for `timeout` or longer at `now`, longest silent first,
    /// without writing them off (the head closes their sessions, as it does when it replays
    /// its journal). Looks only at those nodes and one more.
    pub fn silent_nodes(&self, now: Instant, timeout: Duration) -> Vec<NodeId> {
        let mut silent = Vec::new();
        let mut next = self.oldest_heard;
        while let Some(node) = next.and_then(|n| self.nodes.get(n)) {
            if node.heard.checked_add(timeout).is_none_or(|deadline| deadline > now) {
                break;
            }
            silent.push(node.id);
            next = node.newer;
        }
        silent
    }

    /// When [`Scheduler::expire_silent`] with `timeout` will next find a silent node, if
    /// nothing is heard before; `None` with no node connected.
    pub fn next_expiry(&self, timeout: Duration) -> Option<Instant> {
        self.nodes.get(self.oldest_heard?)?.heard.checked_add(timeout)
    }

    /// Takes the queued commands, in the order they were produced.
    pub fn drain_commands(&mut self) -> std::vec::Drain<'_, Command> {
        self.commands.drain(..)
    }

    /// Ready tasks waiting for a node with room (including infeasible ones).
    pub fn queued_len(&self) -> usize {
        self.queued
    }

    /// Connected nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Tasks leased to `node`, sorted; empty for an unknown node.
    pub fn running_on(&self, node: NodeId) -> Vec<TaskId> {
        let Some(node) = self.node(node) else { return Vec::new() };
        let mut running: Vec<TaskId> =
            node.running.iter().filter_map(|&t| Some(self.tasks.get(t)?.id)).collect();
        running.sort_unstable();
        running
    }

    /// What `node` has free right now (including its `node:<name>` resource; not what the
    /// bundles of placement groups reserved there offer their tasks).
    pub fn node_free(&self, node: NodeId) -> Option<Resources> {
        self.node(node)
            .map(|n| self.names.resources(n.pool.free().filter(|&(res, _)| !self.names.is_group(res))))
    }

    /// Where `task` is, or `None` if the scheduler does not know it (never submitted, dropped with
    /// its session, or forgotten after it ended).
    pub fn task_status(&self, task: TaskId) -> Option<TaskStatus> {
        Some(match &self.tasks.get(*self.task_index.get(&task)?)?.state {
            State::Waiting { .. } => TaskStatus::Waiting,
            State::Queued { .. } => TaskStatus::Queued,
            State::Running { node, .. } => TaskStatus::Running { node: self.nodes.get(*node)?.id },
            State::Finished => TaskStatus::Finished,
            State::Failed(_) => TaskStatus::Failed,
        })
    }

    /// Whether `task` runs and was asked to stop: whatever it reports, it ends cancelled.
    pub fn is_cancelled(&self, task: TaskId) -> bool {
        let Some(&slot) = self.task_index.get(&task) else { return false };
        matches!(self.tasks.get(slot), Some(Task { state: State::Running { cancel, .. }, .. }) if *cancel != Cancel::No)
    }

    /// How many times `task` was dispatched, or `None` if the scheduler does not know it.
    pub fn attempts(&self, task: TaskId) -> Option<u32> {
        Some(self.tasks.get(*self.task_index.get(&task)?)?.attempts)
    }

    /// After a restore: a snapshot of a head that counted dispatches only has every dispatch
    /// count as a run, as that head did (a task that may not be retried must not run twice).
    pub(crate) fn fill_in_older_snapshot(&mut self) {
        for (_, task) in self.tasks.iter_mut() {
            if task.runs == runs_not_counted() {
                task.runs = task.attempts;
            }
        }
    }

    /// How many of `task`'s attempts really ran (were acknowledged or reported), or `None` if
    /// the scheduler does not know it.
    pub fn runs(&self, task: TaskId) -> Option<u32> {
        Some(self.tasks.get(*self.task_index.get(&task)?)?.runs)
    }

    /// The time of the latest event.
    pub fn last_event_at(&self) -> Option<Instant> {
        self.last_event
    }

    fn node(&self, node: NodeId) -> Option<&Node> {
        self.nodes.get(*self.node_index.get(&node)?)
    }

    /// The unfinished task `(slot, seq)` refers to, if it still exists.
    fn unfinished(&self, slot: TaskSlot, seq: u64) -> Option<&Task> {
        self.tasks.get(slot).filter(|t| t.seq == seq && t.state.shape().is_some())
    }

    fn remove_task(&mut self, slot: TaskSlot) -> Option<Task> {
        let task = self.tasks.remove(slot)?;
        self.task_index.remove(&task.id);
        self.lost_on.remove(&task.id);
        Some(task)
    }

    // ---- nodes ----

    fn node_joined(
        &mut self,
        now: Instant,
        id: NodeId,
        name: String,
        mut resources: Resources,
        functions: Vec<FunctionKey>,
        labels: Labels,
    ) {
        if self.node_index.contains_key(&id) {
            return;
        }
        let affinity = format!("{NODE_PREFIX}{name}");
        if !resources.contains(&affinity) {
            // A name that is not a valid resource name only means the node cannot be pinned to.
            let _ = resources.set(&affinity, ResourceAmount::whole(1));
        }
        let pool = Pool::new(&self.names.need(&resources));
        let mut fns: Vec<FunctionSlot> = functions.into_iter().map(|key| self.intern_function(key)).collect();
        fns.sort_unstable();
        fns.dedup();
        let node = Node {
            id,
            name,
            capacity: resources,
            pool,
            functions: fns,
            shapes: Vec::new(),
            running: Vec::new(),
            heard: now, // Set again by `link_heard`.
            paused: false,
            older: None,
            newer: None,
            labels,
            bundles: Vec::new(),
        };
        let n = self.nodes.insert(node);
        self.node_index.insert(id, n);
        self.link_heard(n, now);
        let Some(node) = self.nodes.get_mut(n) else { return };
        for &f in &node.functions {
            self.functions[f].nodes.push(n);
        }
        for (s, shape) in self.shapes.iter_mut() {
            if node.functions.binary_search(&shape.key.function).is_ok() && node.can_host(&shape.key) {
                shape.capable.push(n);
                node.shapes.push(s);
            }
        }
    }

    /// A node that joined (not paused) is offered what waits: pending groups get its room
    /// before queued tasks do.
    fn offer_joined(&mut self, id: NodeId) {
        let Some(&n) = self.node_index.get(&id) else { return };
        self.place_groups(true);
        self.fill_node(n);
    }

    /// Nodes that went away at once, with their resources. All are gone before any of their
    /// tasks is placed again, so none lands on a node lost in the same breath.
    fn nodes_lost(&mut self, ids: &[NodeId]) {
        let mut running: Vec<(u64, TaskSlot, usize)> = Vec::new();
        let mut shapes = Vec::new();
        let mut names = Vec::new();
        for id in ids {
            let Some(n) = self.node_index.remove(id) else { continue };
            self.unlink_heard(n);
            let Some(node) = self.nodes.remove(n) else { continue };
            if !node.bundles.is_empty() {
                self.bundles_lost(&node.bundles);
            }
            for &f in &node.functions {
                self.functions[f].nodes.retain(|&x| x != n);
            }
            for &s in &node.shapes {
                if let Some(shape) = self.shapes.get_mut(s) {
                    shape.capable.retain(|&x| x != n);
                }
            }
            let name = names.len();
            running.extend(node.running.iter().filter_map(|&t| Some((self.tasks.get(t)?.seq, t, name))));
            shapes.extend(node.shapes);
            names.push(node.name);
        }
        // Bundles lost go elsewhere first, so their tasks find them there.
        self.place_groups(true);
        // Oldest first: failures are announced in submission order.
        running.sort_unstable();
        let mut again = Vec::new();
        for (_, task, name) in running {
            if self.worker_lost(task, &names[name]) {
                again.push(task);
            }
        }
        self.run_again(&again);
        self.flush_ready();
        // Several lost nodes may have shared a shape: report its stranded tasks once.
        shapes.sort_unstable();
        shapes.dedup();
        for s in shapes {
            if self.shapes.get(s).is_some_and(|shape| shape.capable.is_empty() && shape.queued > 0) {
                self.report_infeasible(s, None);
            }
        }
    }

    /// The node running task `slot` went away, and its resources with it. Returns true when the
    /// task is to run again; otherwise it ended (cancelled, or out of attempts).
    fn worker_lost(&mut self, slot: TaskSlot, node_name: &str) -> bool {
        let Some(task) = self.tasks.get_mut(slot) else { return false };
        let State::Running { shape, cancel, started, .. } = task.state else { return false };
        // The acknowledgement may have been lost with the head or the link: a task that may
        // not run twice (`max_retries` 0) is never sent again on the strength of its absence.
        let free = !started && task.max_attempts != 1 && task.unacknowledged_losses < UNACKNOWLEDGED_LOSSES;
        if free {
            task.unacknowledged_losses += 1;
        } else {
            if !started {
                task.runs = task.runs.saturating_add(1);
            }
            self.lost_on.entry(task.id).or_default().push(node_name.to_string());
        }
        let error = if cancel != Cancel::No {
            TaskError::Cancelled { function: self.function_name(shape) }
        } else if free || task.attempts_left() {
            return true;
        } else {
            let (attempts, lost_on) = (task.runs, self.lost_on.remove(&task.id).unwrap_or_default());
            let function = self.function_name(shape);
            TaskError::WorkerLost { function, node: node_name.to_string(), attempts, lost_on }
        };
        self.settle(slot, Err(error), true);
        false
    }

    fn set_paused(&mut self, id: NodeId, paused: bool) {
        let Some(&n) = self.node_index.get(&id) else { return };
        let Some(node) = self.nodes.get_mut(n) else { return };
        let was = std::mem::replace(&mut node.paused, paused);
        if was && !paused {
            self.place_groups(true);
            self.fill_node(n);
        }
    }

    fn node_heard(&mut self, id: NodeId, now: Instant) {
        let Some(&n) = self.node_index.get(&id) else { return };
        if Some(n) != self.newest_heard {
            self.unlink_heard(n);
            self.link_heard(n, now);
        } else if let Some(node) = self.nodes.get_mut(n) {
            node.heard = node.heard.max(now);
        }
    }

    /// Appends node `n`, heard at `now`, to the list by last-heard time. An event dated before
    /// the newest node was heard counts as at that time, so the list stays in order.
    fn link_heard(&mut self, n: NodeSlot, now: Instant) {
        let newest = self.newest_heard;
        let heard = newest.and_then(|p| self.nodes.get(p)).map_or(now, |node| node.heard.max(now));
        let Some(node) = self.nodes.get_mut(n) else { return };
        node.heard = heard;
        node.older = newest;
        node.newer = None;
        match newest.and_then(|p| self.nodes.get_mut(p)) {
            Some(previous) => previous.newer = Some(n),
            None => self.oldest_heard = Some(n),
        }
        self.newest_heard = Some(n);
    }

    /// Takes node `n` out of the list by last-heard time.
    fn unlink_heard(&mut self, n: NodeSlot) {
        let Some(node) = self.nodes.get(n) else { return };
        let (older, newer) = (node.older, node.newer);
        match older.and_then(|o| self.nodes.get_mut(o)) {
            Some(node) => node.newer = newer,
            None => self.oldest_heard = newer,
        }
        match newer.and_then(|o| self.nodes.get_mut(o)) {
            Some(node) => node.older = older,
            None => self.newest_heard = older,
        }
    }

    // ---- functions and shapes ----

    fn intern_function(&mut self, key: FunctionKey) -> FunctionSlot {
        if let Some(&f) = self.function_index.get(&key) {
            return f;
        }
        let name = key.name.clone();
        let f = self.functions.push(Function { key: key.clone(), nodes: Vec::new() });
        self.functions_by_name.entry(name).or_default().push(f);
        self.function_index.insert(key, f);
        f
    }

    fn function_name(&self, shape: ShapeSlot) -> String {
        self.shapes
            .get(shape)
            .and_then(|s| self.functions.get(s.key.function))
            .map(|f| f.key.name.clone())
            .unwrap_or_default()
    }

    /// Whether connected nodes can run `key` at all. With no node connected, anything may still
    /// come, so the task waits.
    fn check_function(&self, key: &FunctionKey) -> Result<(), TaskError> {
        let announced = |f: &FunctionSlot| !self.functions[*f].nodes.is_empty();
        if self.function_index.get(key).is_some_and(announced) || !self.any_node_runs_tasks() {
            return Ok(());
        }
        let mut found: Vec<String> = self
            .functions_by_name
            .get(&key.name)
            .into_iter()
            .flatten()
            .filter(|f| announced(f))
            .map(|&f| self.functions[f].key.sig_hash.clone())
            .collect();
        found.sort_unstable();
        if found.is_empty() {
            Err(TaskError::UnknownFunction { function: key.name.clone() })
        } else {
            Err(TaskError::SignatureMismatch {
                function: key.name.clone(),
                expected: key.sig_hash.clone(),
                found,
            })
        }
    }

    /// Whether some node runs functions at all, not only service instances (the head's own
    /// node). Until one does, a function nobody offers may still come with the first worker.
    /// Only asked when a submission's function is not offered, so the scan is off the fast path.
    fn any_node_runs_tasks(&self) -> bool {
        self.nodes.iter().any(|(_, node)| {
            node.functions.iter().any(|&f| !self.functions[f].key.name.starts_with(SERVICE_FUNCTION_PREFIX))
        })
    }

    /// The latest submission's shape, when this one has the same function, request and
    /// placement and that function is still runnable (so the function check would pass too).
    fn same_shape_as_last(
        &self,
        function: &FunctionKey,
        request: &Resources,
        placement: &Option<Box<Placement>>,
    ) -> Option<ShapeSlot> {
        let s = self.last_shape?;
        let shape = self.shapes.get(s)?;
        let f = self.functions.get(shape.key.function)?;
        let runnable = !f.nodes.is_empty() || self.nodes.is_empty();
        (runnable && f.key == *function && shape.request == *request && shape.key.placement == *placement)
            .then_some(s)
    }

    /// The shape of `(function, request, placement)`, created on first use.
    fn shape_for(
        &mut self,
        function: FunctionKey,
        request: Resources,
        placement: Option<Box<Placement>>,
    ) -> ShapeSlot {
        let function = self.intern_function(function);
        let key = ShapeKey { function, need: self.names.need(&request), placement };
        if let Some(&s) = self.shape_index.get(&key) {
            return s;
        }
        let cpu = key.need.iter().find(|&&(res, _)| res == Names::CPU).map_or(0, |&(_, amount)| amount);
        let capable: Vec<NodeSlot> = self.functions[function]
            .nodes
            .iter()
            .copied()
            .filter(|&n| self.nodes.get(n).is_some_and(|node| node.can_host(&key)))
            .collect();
        let shape = Shape {
            key: key.clone(),
            request,
            cpu,
            queue: VecDeque::new(),
            queued: 0,
            capable,
            cursor: 0,
            refs: 0,
        };
        let s = self.shapes.insert(shape);
        self.shape_index.insert(key, s);
        if let Some(shape) = self.shapes.get(s) {
            for &n in &shape.capable {
                if let Some(node) = self.nodes.get_mut(n) {
                    node.shapes.push(s);
                }
            }
        }
        s
    }

    /// Called once a task in `state` ended or was dropped: takes it off its shape's queue count
    /// and drops its reference, removing the shape when nothing uses it any more.
    fn leave_shape(&mut self, state: &State) {
        let Some(s) = state.shape() else { return };
        if let State::Waiting { .. } = state {
            debug_assert!(self.waiting > 0, "a waiting task not counted");
            self.waiting = self.waiting.saturating_sub(1);
        }
        let Some(shape) = self.shapes.get_mut(s) else { return };
        if let State::Queued { .. } = state {
            shape.queued -= 1;
            self.queued -= 1;
            if shape.queue.len() > 2 * shape.queued + 64 {
                shape.queue.retain(|&(seq, slot)| is_queued(&self.tasks, slot, seq));
            }
        }
        shape.refs -= 1;
        if shape.refs > 0 {
            return;
        }
        if let Some(shape) = self.shapes.remove(s) {
            self.shape_index.remove(&shape.key);
            for n in shape.capable {
                if let Some(node) = self.nodes.get_mut(n) {
                    node.shapes.retain(|&x| x != s);
                }
            }
        }
    }

    // ---- tasks ----

    fn submit(
        &mut self,
        id: TaskId,
        function: FunctionKey,
        request: Resources,
        deps: &[TaskId],
        retry: Retry,
        placement: Option<Box<Placement>>,
    ) {
        if self.task_index.contains_key(&id) {
            return; // A duplicate id: the first submission stands.
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        // A task in a group asks for what its bundle offers; others keep their request.
        let request = match placement.as_deref().and_then(|p| p.group) {
            None => Ok(request),
            Some(bundle) => self.group_request(&function.name, bundle, &request),
        };
        let request = match request {
            Ok(request) => request,
            Err(error) => {
                self.commands.push(Command::Fail { task: id, error: error.clone() });
                self.insert_task(id, seq, State::Failed(Box::new(error)), retry);
                return;
            }
        };
        let cached = self.same_shape_as_last(&function, &request, &placement);
        let checked = if cached.is_some() { Ok(()) } else { self.check_function(&function) };
        if let Err(error) = checked.and_then(|()| self.check_deps(&function.name, deps)) {
            self.commands.push(Command::Fail { task: id, error: error.clone() });
            self.insert_task(id, seq, State::Failed(Box::new(error)), retry);
            return;
        }
        let shape = match cached {
            Some(s) => s,
            None => self.shape_for(function, request, placement),
        };
        self.last_shape = Some(shape);
        if let Some(shape) = self.shapes.get_mut(shape) {
            shape.refs += 1;
        }
        let slot = self.insert_task(id, seq, State::Waiting { shape, missing: 0 }, retry);
        let mut unfinished = 0;
        for dep in deps {
            if let Some(&d) = self.task_index.get(dep)
                && let Some(task) = self.tasks.get_mut(d)
                && task.state.shape().is_some()
            {
                task.dependents.push((slot, seq));
                unfinished += 1;
            }
        }
        if unfinished == 0 {
            self.make_ready(slot); // `self.ready` is empty between events.
        } else if let Some(Task { state: State::Waiting { missing, .. }, .. }) = self.tasks.get_mut(slot) {
            *missing = unfinished;
        }
    }

    fn insert_task(&mut self, id: TaskId, seq: u64, state: State, retry: Retry) -> TaskSlot {
        if let State::Waiting { .. } = state {
            self.waiting += 1;
        }
        let slot = self.tasks.insert(Task {
            id,
            seq,
            state,
            dependents: Dependents::default(),
            attempts: 0,
            runs: 0,
            max_attempts: retry.max_attempts,
            unacknowledged_losses: 0,
            retry_exceptions: retry.exceptions,
            forgotten: false,
        });
        self.task_index.insert(id, slot);
        slot
    }

    /// Fails a submission whose dependencies are unknown or failed already.
    fn check_deps(&self, function: &str, deps: &[TaskId]) -> Result<(), TaskError> {
        for &dep in deps {
            let unknown = || TaskError::UnknownDependency { function: function.to_string(), dependency: dep };
            let task =
                self.task_index.get(&dep).and_then(|&slot| self.tasks.get(slot)).ok_or_else(unknown)?;
            if task.forgotten {
                return Err(unknown());
            }
            if let State::Failed(error) = &task.state {
                let cause = root_cause(error);
                return Err(TaskError::DependencyFailed {
                    function: function.to_string(),
                    dependency: dep,
                    cause,
                });
            }
        }
        Ok(())
    }

    fn task_started(&mut self, id: TaskId, reporter: NodeId) {
        let Some(&slot) = self.task_index.get(&id) else { return };
        let Some(task) = self.tasks.get_mut(slot) else { return };
        let State::Running { node, ref mut started, .. } = task.state else { return };
        if *started || self.nodes.get(node).map(|n| n.id) != Some(reporter) {
            return;
        }
        *started = true;
        task.runs = task.runs.saturating_add(1);
    }

    fn task_finished(&mut self, id: TaskId, reporter: NodeId, error: Option<TaskError>) {
        let Some(&slot) = self.task_index.get(&id) else { return };
        let Some(&Task { state: State::Running { shape, node, pos, cpu_released, cancel, .. }, .. }) =
            self.tasks.get(slot)
        else {
            return; // Not running: unknown, a duplicate report, or from a node already lost.
        };
        if self.nodes.get(node).map(|n| n.id) != Some(reporter) {
            return; // From a node it is not leased to: an earlier attempt's, already written off.
        }
        // A report is an acknowledgement too (the node may not have sent one first).
        self.task_started(id, reporter);
        let Some(task) = self.tasks.get(slot) else { return };
        // A run stopped by its timeout is the function's failure too: with `retry_exceptions`
        // it runs again (with its full timeout), like one that returned `Err`.
        let again = cancel == Cancel::No
            && task.retry_exceptions
            && task.attempts_left()
            && matches!(
                error,
                Some(
                    TaskError::Application { .. }
                        | TaskError::TimedOut { .. }
                        | TaskError::SetupFailed { .. }
                )
            );
        self.unlist_running(node, pos);
        if let (Some(n), Some(s)) = (self.nodes.get_mut(node), self.shapes.get(shape)) {
            n.pool.give_back(&s.key.need, cpu_released.then_some(Names::CPU));
        }
        // Pending groups get the freed room first (nothing to do when there are none).
        self.place_groups(false);
        if again {
            // Queued before the freed room is offered, so it may take it back as the oldest.
            let fresh = self.requeue(slot);
            self.fill_node(node);
            self.place(fresh.as_slice());
            return;
        }
        if cancel != Cancel::No {
            // Whatever it reported, it was cancelled: the owner hears that instead.
            let function = self.function_name(shape);
            self.settle(slot, Err(TaskError::Cancelled { function }), true);
        } else {
            self.settle(slot, error.map_or(Ok(()), Err), false);
        }
        // Tasks already queued get the freed room before the ones this finish made ready.
        self.fill_node(node);
        self.flush_ready();
    }

    fn task_cancelled(&mut self, id: TaskId, force: bool) {
        let Some(&slot) = self.task_index.get(&id) else { return };
        let Some(task) = self.tasks.get(slot) else { return };
        match task.state {
            State::Waiting { shape, .. } | State::Queued { shape } => {
                let function = self.function_name(shape);
                self.settle(slot, Err(TaskError::Cancelled { function }), true);
            }
            State::Running { node, cancel, .. } => {
                let wanted = if force { Cancel::Forced } else { Cancel::Asked };
                if cancel >= wanted {
                    return; // Asked before, at least as firmly.
                }
                if let Some(Task { state: State::Running { cancel, .. }, .. }) = self.tasks.get_mut(slot) {
                    *cancel = wanted;
                }
                if let Some(node) = self.nodes.get(node) {
                    self.commands.push(Command::Cancel { task: id, node: node.id, force });
                }
            }
            State::Finished | State::Failed(_) => {}
        }
    }

    /// Takes the task at `pos` off node `n`'s running list, keeping the moved task's `pos` right.
    fn unlist_running(&mut self, n: NodeSlot, pos: u32) {
        let Some(node) = self.nodes.get_mut(n) else { return };
        let pos = pos as usize;
        if pos >= node.running.len() {
            return;
        }
        node.running.swap_remove(pos);
        if let Some(&moved) = node.running.get(pos)
            && let Some(Task { state: State::Running { pos: moved_pos, .. }, .. }) = self.tasks.get_mut(moved)
        {
            *moved_pos = pos as u32;
        }
    }

    fn task_blocked(&mut self, id: TaskId) {
        let Some(&slot) = self.task_index.get(&id) else { return };
        let Some(Task { state: State::Running { shape, node, cpu_released, .. }, .. }) =
            self.tasks.get_mut(slot)
        else {
            return;
        };
        if std::mem::replace(cpu_released, true) {
            return; // Blocked before: its CPU is back already.
        }
        let (shape, node) = (*shape, *node);
        let cpu = self.shapes.get(shape).map_or(0, |s| s.cpu);
        if cpu > 0
            && let Some(n) = self.nodes.get_mut(node)
        {
            n.pool.give_back(&[(Names::CPU, cpu)], None);
            self.fill_node(node);
        }
    }

    fn task_forgotten(&mut self, id: TaskId) {
        let Some(&slot) = self.task_index.get(&id) else { return };
        let Some(task) = self.tasks.get_mut(slot) else { return };
        if task.state.shape().is_some() {
            task.forgotten = true; // Still unfinished: it runs, then goes.
        } else {
            self.remove_task(slot);
        }
    }

    /// Drops the session's unstarted tasks. Scans all tasks, which is fine for a rare event.
    fn session_closed(&mut self, session: SessionId) {
        let mut dropped: Vec<(u64, TaskSlot)> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.id.session() == session && matches!(t.state, State::Waiting { .. } | State::Queued { .. })
            })
            .map(|(slot, t)| (t.seq, slot))
            .collect();
        dropped.sort_unstable();
        let mut orphans = Vec::new();
        for (_, slot) in dropped {
            let Some(mut task) = self.remove_task(slot) else { continue };
            self.leave_shape(&task.state);
            orphans
                .extend(task.dependents.take().into_iter().map(|(dependent, seq)| (dependent, seq, task.id)));
        }
        // Tasks of other sessions that waited on a dropped task can never run.
        for (dependent, seq, dependency) in orphans {
            let Some(shape) = self.unfinished(dependent, seq).and_then(|t| t.state.shape()) else { continue };
            let error = TaskError::UnknownDependency { function: self.function_name(shape), dependency };
            self.settle(dependent, Err(error), true);
        }
        self.remove_groups_of(session);
    }

    /// Records that the unfinished task in `slot` ended with `outcome` (announcing a failure to
    /// its owner when the scheduler decided it), and carries the outcome down the dependency
    /// graph: dependents whose last dependency succeeded go to `self.ready`, and a failure fails
    /// the whole downstream chain. Iterative, so a long chain cannot overflow the stack.
    fn settle(&mut self, slot: TaskSlot, outcome: Result<(), TaskError>, announce: bool) {
        if !self.lost_on.is_empty()
            && let Some(task) = self.tasks.get(slot)
        {
            self.lost_on.remove(&task.id);
        }
        // The common case, a success nobody waits on, skips the propagation machinery.
        if outcome.is_ok()
            && let Some(task) = self.tasks.get_mut(slot)
            && task.dependents.0.is_none()
        {
            if task.state.shape().is_none() {
                return;
            }
            let old = std::mem::replace(&mut task.state, State::Finished);
            let forgotten = task.forgotten;
            self.leave_shape(&old);
            if forgotten {
                self.remove_task(slot);
            }
            return;
        }
        let mut work = VecDeque::new();
        let mut next = Some((slot, outcome, announce));
        while let Some((slot, outcome, announce)) = next.take().or_else(|| work.pop_front()) {
            let Some(task) = self.tasks.get_mut(slot) else { continue };
            if task.state.shape().is_none() {
                continue; // Already ended (a task reached twice through two failed dependencies).
            }
            let id = task.id;
            let (state, cause) = match outcome {
                Ok(()) => (State::Finished, None),
                Err(error) => {
                    if announce {
                        self.commands.push(Command::Fail { task: id, error: error.clone() });
                    }
                    let cause = root_cause(&error);
                    (State::Failed(Box::new(error)), Some(cause))
                }
            };
            let old = std::mem::replace(&mut task.state, state);
            let dependents = task.dependents.take();
            let forgotten = task.forgotten;
            for (dependent, seq) in dependents {
                let Some(task) = self.tasks.get_mut(dependent).filter(|t| t.seq == seq) else { continue };
                let State::Waiting { shape, missing } = &mut task.state else { continue };
                match &cause {
                    None => {
                        *missing -= 1;
                        if *missing == 0 {
                            self.ready.push(dependent);
                        }
                    }
                    Some(cause) => {
                        let shape = *shape;
                        let function = self.function_name(shape);
                        let error =
                            TaskError::DependencyFailed { function, dependency: id, cause: cause.clone() };
                        work.push_back((dependent, Err(error), true));
                    }
                }
            }
            self.leave_shape(&old);
            if forgotten {
                self.remove_task(slot);
            }
        }
    }

    /// Puts tasks that ran (their leases are gone), oldest first in `slots`, back in front of
    /// their shapes' queues, and places them where they fit now.
    fn run_again(&mut self, slots: &[TaskSlot]) {
        let mut fresh = Vec::new();
        // The youngest goes to the front first, so the oldest ends up there.
        for &slot in slots.iter().rev() {
            fresh.extend(self.requeue(slot));
        }
        self.place(&fresh);
    }

    /// Queues the running task in `slot` again, in front of its shape's queue: it left that
    /// queue before anything now in it was queued, so it stays ahead of younger tasks. Returns
    /// its shape if nothing else of it was queued; then nothing checked yet where it fits.
    fn requeue(&mut self, slot: TaskSlot) -> Option<ShapeSlot> {
        let task = self.tasks.get_mut(slot)?;
        let State::Running { shape: s, .. } = task.state else { return None };
        task.state = State::Queued { shape: s };
        let seq = task.seq;
        let shape = self.shapes.get_mut(s)?;
        shape.queue.push_front((seq, slot));
        shape.queued += 1;
        self.queued += 1;
        (shape.queued == 1).then_some(s)
    }

    /// Starts queued tasks of `shapes` wherever they fit, oldest first across them, until none
    /// fits anywhere. For shapes that just got queued tasks while no node's room grew: other
    /// shapes still fit nowhere, and these have to look at every node they could use.
    fn place(&mut self, shapes: &[ShapeSlot]) {
        let mut heap = std::mem::take(&mut self.heap);
        heap.clear();
        for &s in shapes {
            if let Some(shape) = self.shapes.get_mut(s)
                && let Some((seq, _)) = front(&mut shape.queue, &self.tasks)
            {
                heap.push(Reverse((seq, s)));
            }
        }
        while let Some(Reverse((_, s))) = heap.pop() {
            // Room only shrinks during the pass: a shape that fits nowhere now is done.
            let Some(n) = self.pick_node(s) else { continue };
            if self.start(s, n)
                && let Some(shape) = self.shapes.get_mut(s)
                && let Some((seq, _)) = front(&mut shape.queue, &self.tasks)
            {
                heap.push(Reverse((seq, s)));
            }
        }
        self.heap = heap;
    }

    /// Queues the tasks in `self.ready` and places them where they fit now.
    fn flush_ready(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        for slot in ready.drain(..) {
            self.make_ready(slot);
        }
        self.ready = ready;
    }

    fn make_ready(&mut self, slot: TaskSlot) {
        let Some(task) = self.tasks.get_mut(slot) else { return };
        let State::Waiting { shape: s, missing: 0 } = task.state else { return };
        task.state = State::Queued { shape: s };
        debug_assert!(self.waiting > 0, "a waiting task not counted");
        self.waiting = self.waiting.saturating_sub(1);
        let seq = task.seq;
        let Some(shape) = self.shapes.get_mut(s) else { return };
        shape.queue.push_back((seq, slot));
        shape.queued += 1;
        self.queued += 1;
        if shape.capable.is_empty() {
            self.report_infeasible(s, Some(slot));
        } else if shape.queued == 1
            && let Some(n) = self.pick_node(s)
        {
            // With older tasks of this shape queued, none of its nodes has room (the invariant),
            // so only a lone task needs to look.
            self.start(s, n);
        }
    }

    /// The next node (round-robin from the shape's cursor) with room for the shape, or the
    /// one its strategy prefers.
    fn pick_node(&mut self, s: ShapeSlot) -> Option<NodeSlot> {
        let shape = self.shapes.get_mut(s)?;
        if let Some(placement) = &shape.key.placement
            && placement.strategy != Strategy::Default
        {
            let strategy = placement.strategy;
            return self.pick_by_strategy(s, strategy);
        }
        let len = shape.capable.len();
        for i in 0..len {
            let pos = (shape.cursor + i) % len;
            let n = shape.capable[pos];
            if self.nodes.get(n).is_some_and(|node| !node.paused && node.pool.fits(&shape.key.need)) {
                shape.cursor = (pos + 1) % len;
                return Some(n);
            }
        }
        None
    }

    /// Among the shape's nodes with room now: the one running the fewest tasks (`Spread`) or
    /// the most (`Pack`), the first in the shape's list on a tie.
    fn pick_by_strategy(&self, s: ShapeSlot, strategy: Strategy) -> Option<NodeSlot> {
        let shape = self.shapes.get(s)?;
        let with_room = shape.capable.iter().filter_map(|&n| {
            let node = self.nodes.get(n)?;
            (!node.paused && node.pool.fits(&shape.key.need)).then_some((n, node.running.len()))
        });
        let best = match strategy {
            Strategy::Pack => with_room.min_by_key(|&(_, running)| Reverse(running)),
            _ => with_room.min_by_key(|&(_, running)| running),
        };
        best.map(|(n, _)| n)
    }

    /// Offers node `n`'s free room to the shapes it can run, oldest waiting task first, until
    /// nothing queued fits there. Other nodes need no look: their room did not grow.
    fn fill_node(&mut self, n: NodeSlot) {
        let Some(node) = self.nodes.get(n).filter(|node| !node.paused) else { return };
        let waiting_and_fits = |shape: &Shape| shape.queued > 0 && node.pool.fits(&shape.key.need);
        let mut candidates =
            node.shapes.iter().copied().filter(|&s| self.shapes.get(s).is_some_and(waiting_and_fits));
        let Some(only) = candidates.next() else { return };
        if candidates.next().is_none() {
            // One shape can use the room: no ordering between shapes needed.
            while self
                .nodes
                .get(n)
                .zip(self.shapes.get(only))
                .is_some_and(|(node, shape)| shape.queued > 0 && node.pool.fits(&shape.key.need))
                && self.start(only, n)
            {}
            return;
        }
        let mut heap = std::mem::take(&mut self.heap);
        heap.clear();
        if let Some(node) = self.nodes.get(n) {
            for &s in &node.shapes {
                if let Some(shape) = self.shapes.get_mut(s)
                    && shape.queued > 0
                    && node.pool.fits(&shape.key.need)
                    && let Some((seq, _)) = front(&mut shape.queue, &self.tasks)
                {
                    heap.push(Reverse((seq, s)));
                }
            }
        }
        let fits = |sched: &Scheduler, s: ShapeSlot| {
            let (node, shape) = (sched.nodes.get(n), sched.shapes.get(s));
            node.zip(shape).is_some_and(|(node, shape)| node.pool.fits(&shape.key.need))
        };
        while let Some(Reverse((_, s))) = heap.pop() {
            // Another shape may have taken the room since this one was pushed; then it no longer
            // fits here, and will not during this pass.
            if !fits(self, s) || !self.start(s, n) {
                continue;
            }
            if fits(self, s)
                && let Some(shape) = self.shapes.get_mut(s)
                && let Some((seq, _)) = front(&mut shape.queue, &self.tasks)
            {
                heap.push(Reverse((seq, s)));
            }
        }
        self.heap = heap;
    }

    /// Leases the oldest queued task of shape `s` to node `n`; the caller checked it fits.
    /// Returns false if nothing was queued.
    fn start(&mut self, s: ShapeSlot, n: NodeSlot) -> bool {
        #[cfg(test)]
        if let Some(crate::planted::PlantedBug::NeverPlace(function)) = crate::planted::planted()
            && self.shapes.get(s).is_some_and(|shape| self.functions[shape.key.function].key.name == function)
        {
            return false;
        }
        let (Some(shape), Some(node)) = (self.shapes.get_mut(s), self.nodes.get_mut(n)) else { return false };
        let Some((_, slot)) = front(&mut shape.queue, &self.tasks) else { return false };
        let Some(task) = self.tasks.get_mut(slot) else { return false };
        shape.queue.pop_front();
        shape.queued -= 1;
        self.queued -= 1;
        node.pool.take(&shape.key.need);
        let pos = u32::try_from(node.running.len()).unwrap_or(u32::MAX);
        task.state = State::Running {
            shape: s,
            node: n,
            pos,
            cpu_released: false,
            cancel: Cancel::No,
            started: false,
        };
        task.attempts = task.attempts.saturating_add(1);
        node.running.push(slot);
        self.commands.push(Command::Dispatch { task: task.id, node: node.id, attempt: task.attempts });
        true
    }

    /// Reports the task in slot `only`, or every queued task of shape `s`, as infeasible.
    fn report_infeasible(&mut self, s: ShapeSlot, only: Option<TaskSlot>) {
        let Some(shape) = self.shapes.get(s) else { return };
        if shape.key.placement.as_ref().is_some_and(|p| p.group.is_some())
            && self.waits_for_group(shape).is_some()
        {
            return; // Its bundle is not reserved yet: the group reports, if it cannot be placed.
        }
        let reason = self.infeasible_reason(shape);
        let slots: Vec<TaskSlot> = match only {
            Some(slot) => vec![slot],
            None => shape
                .queue
                .iter()
                .filter(|&&(seq, slot)| is_queued(&self.tasks, slot, seq))
                .map(|e| e.1)
                .collect(),
        };
        for slot in slots {
            if let Some(task) = self.tasks.get(slot) {
                self.commands.push(Command::Infeasible { task: task.id, reason: reason.clone() });
            }
        }
    }

    fn infeasible_reason(&self, shape: &Shape) -> String {
        let function = &self.functions[shape.key.function];
        if self.nodes.is_empty() {
            return format!("{} requests {}, but no node is connected", function.key, shape.request);
        }
        if function.nodes.is_empty() {
            return format!("no connected node has the function {}", function.key);
        }
        const SHOWN: usize = 3;
        let wanted = shape.key.placement.as_ref().map(|p| &p.labels).filter(|labels| !labels.is_empty());
        if let Some(wanted) = wanted
            && !function
                .nodes
                .iter()
                .filter_map(|&n| self.nodes.get(n))
                .any(|node| node.labels.satisfy(wanted))
        {
            let mut lacking: Vec<String> = function
                .nodes
                .iter()
                .filter_map(|&n| self.nodes.get(n))
                .take(SHOWN)
                .map(|node| format!("{} lacks {}", node.name, node.labels.missing(wanted).join(", ")))
                .collect();
            if function.nodes.len() > SHOWN {
                lacking.push(format!("and {} more", function.nodes.len() - SHOWN));
            }
            return format!(
                "{} asks for labels {wanted}, which no connected node with this function has: {}",
                function.key,
                lacking.join("; ")
            );
        }
        if let Some(bundle) = shape.key.placement.as_ref().and_then(|p| p.group) {
            return format!(
                "{} runs in {}{}, whose node does not offer the function",
                function.key,
                bundle.group,
                bundle.bundle.map_or_else(String::new, |b| format!(" bundle {b}"))
            );
        }
        let mut short: Vec<String> = function
            .nodes
            .iter()
            .filter_map(|&n| self.nodes.get(n))
            .take(SHOWN)
            .map(|node| {
                format!("{} is short of {}", node.name, node.capacity.shortfall(&shape.request).join(", "))
            })
            .collect();
        if function.nodes.len() > SHOWN {
            short.push(format!("and {} more", function.nodes.len() - SHOWN));
        }
        format!(
            "{} requests {}, more than any connected node with this function has: {}",
            function.key,
            shape.request,
            short.join("; ")
        )
    }
}

/// The oldest live entry of a shape's queue, dropping entries of tasks that left it.
fn front(queue: &mut VecDeque<(u64, TaskSlot)>, tasks: &Slab<TaskSlot, Task>) -> Option<(u64, TaskSlot)> {
    while let Some(&(seq, slot)) = queue.front() {
        if is_queued(tasks, slot, seq) {
            return Some((seq, slot));
        }
        queue.pop_front();
    }
    None
}

fn is_queued(tasks: &Slab<TaskSlot, Task>, slot: TaskSlot, seq: u64) -> bool {
    tasks.get(slot).is_some_and(|t| t.seq == seq && matches!(t.state, State::Queued { .. }))
}

/// The cause a dependent's `DependencyFailed` carries: the original error, not a nesting of one
/// `DependencyFailed` per hop, so errors stay small (and their `Drop` shallow) on long chains.
fn root_cause(error: &TaskError) -> Box<TaskError> {
    match error {
        TaskError::DependencyFailed { cause, .. } => cause.clone(),
        other => Box::new(other.clone()),
    }
}
