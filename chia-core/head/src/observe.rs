//! What the head tells about itself: `chia status`, `list`, `show`, `explain` and `cancel`
//! ([`PeerToHead::Inspect`] and [`PeerToHead::CancelTasks`]), the stuck-task watchdog, and
//! the figures its metrics endpoint serves ([`HeadCore::metrics`]).
//!
//! Nothing here walks every task while the head waits: counts (by state, by job, by
//! function, the bytes of results held) move as tasks do, listings walk an index in
//! submission order and stop after a bounded number of records, and ended tasks are
//! remembered in a bounded ring once their records are freed. The `Observer` is not kept
//! in a snapshot: after a recovery its totals count from this head's start, and the counts
//! of what it holds are taken again from the records.
//!
//! [`PeerToHead::Inspect`]: chia_core::protocol::PeerToHead::Inspect
//! [`PeerToHead::CancelTasks`]: chia_core::protocol::PeerToHead::CancelTasks

use crate::core::{HeadCore, TaskKind, TaskRecord};
use crate::scheduler::TaskStatus;
use chia_core::inspect::{
    Answer, AttemptView, CancelTarget, Cancelled, ClusterStatus, Demand, ENDED_TASKS_KEPT, Explanation,
    JobView, MAX_PAGE, NodeView, Query, Reason, SCAN_PER_PAGE, Stuck, TaskCounts, TaskFilter, TaskPage,
    TaskState, TaskTotals, TaskView,
};
use chia_core::protocol::{Arg, Outcome, WorkerFigures};
use chia_core::{SessionId, TagPatterns, TaskError, TaskId};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Distinct function names the per-function figures keep; the rest are counted under
/// [`OTHER_FUNCTIONS`] (function names come from peers: a label per name would be memory a
/// peer can make the head hold).
pub const MAX_FUNCTION_LABELS: usize = 1_000;
/// The name the figures of functions beyond [`MAX_FUNCTION_LABELS`] (or with names too long
/// to be a label) are summed under.
pub const OTHER_FUNCTIONS: &str = "(other)";

/// Service figures the head keeps of one worker's report, and the longest name, label or help
/// text among them: what a peer sends is memory the head holds until its next report.
pub const MAX_SERVICE_FIGURES: usize = 256;
/// The longest service name, figure name or help text (bytes) of a kept service figure; a
/// figure with a longer one is dropped.
pub const MAX_FIGURE_TEXT: usize = 256;

/// `figures` as the head keeps them: the service figures within [`MAX_SERVICE_FIGURES`], and
/// none whose texts exceed [`MAX_FIGURE_TEXT`].
pub(crate) fn bounded_figures(mut figures: WorkerFigures) -> WorkerFigures {
    figures.services.retain(|figure| {
        [&figure.service, &figure.name, &figure.help].iter().all(|text| text.len() <= MAX_FIGURE_TEXT)
    });
    figures.services.truncate(MAX_SERVICE_FIGURES);
    // Truncating keeps the capacity the peer's list needed.
    figures.services.shrink_to_fit();
    figures
}

/// Upper bounds (seconds) of the buckets of the time-queued and time-running histograms.
pub const SECONDS_BUCKETS: [f64; 14] =
    [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0];

/// The longest tag pattern a listing compiles (under the head's lock).
const MAX_PATTERN: usize = 1024;

/// The longest error text a run keeps: a function whose error carries a tool's whole output
/// must not make the head hold it for every run of 10,000 remembered tasks.
const MAX_KEPT_TEXT: usize = 4096;

/// The longest function name counted under its own label.
const MAX_FUNCTION_LABEL: usize = 200;

/// Tasks one `CancelTasks` of a job cancels; the answer says when more are left.
pub const CANCEL_BATCH: usize = 10_000;

/// Nodes an explanation names for one task.
const NODES_EXPLAINED: usize = 20;

/// A histogram of durations (cumulative buckets are made when it is served).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Observations per bucket of [`SECONDS_BUCKETS`], and above the last.
    pub buckets: [u64; SECONDS_BUCKETS.len() + 1],
    /// The sum of every observation, in seconds.
    pub sum_seconds: f64,
    /// How many observations there were.
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: [0; SECONDS_BUCKETS.len() + 1], sum_seconds: 0.0, count: 0 }
    }
}

impl Histogram {
    fn observe(&mut self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket =
            SECONDS_BUCKETS.iter().position(|&bound| seconds <= bound).unwrap_or(SECONDS_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

/// What happened to the tasks of one function since the head started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FunctionFigures {
    /// Submitted, ended by outcome, retried, bypassed: what `chia status` sums over functions.
    pub counts: TaskTotals,
    /// From submission to the first dispatch.
    pub queued: Histogram,
    /// From the last dispatch to the end, for tasks that ran.
    pub running: Histogram,
}

/// Everything the metrics endpoint serves of the head, taken at once.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// How long the head has run (after a restart: since it recovered).
    pub head_up: Duration,
    /// Per function name (at most [`MAX_FUNCTION_LABELS`], the rest under
    /// [`OTHER_FUNCTIONS`]).
    pub functions: BTreeMap<String, FunctionFigures>,
    /// Queued tasks by shape, as `chia status` shows them.
    pub demand: Vec<Demand>,
    /// Function tasks held now, by state.
    pub counts: TaskCounts,
    /// Every joined node, with its worker's latest figures.
    pub nodes: Vec<NodeView>,
    /// Services registered now.
    pub services: usize,
    /// Connected drivers.
    pub jobs: usize,
    /// Bytes of task results the head holds.
    pub result_bytes: u64,
    /// Shapes the watchdog found stuck since the head started, and those stuck now.
    pub stuck_found: u64,
    /// Shapes stuck at the watchdog's latest look (see `stuck_found`).
    pub stuck_now: usize,
}

/// One run of a function task.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    attempt: u32,
    node: Box<str>,
    sent: Instant,
    started: Option<Instant>,
    ended: Option<(Instant, String)>,
}

/// A freed task record kept for `chia show` and listings, without its value.
pub(crate) struct Remembered {
    record: TaskRecord,
    result_bytes: Option<u64>,
}

/// How a run ended.
pub(crate) enum RunEnd<'a> {
    Reported(&'a Outcome),
    /// It was asked to stop: whatever it reported, it ended cancelled.
    Cancelled,
    WorkerLost,
}

#[derive(Clone, Copy, Debug, Default)]
struct JobCounts {
    submitted: u64,
    unfinished: u64,
}

/// The watchdog: a shape with queued tasks that a node has room for now, seen so at every
/// look for at least `stuck_after`, is stuck (the scheduler places such tasks at the event
/// that makes room, so this is a task left behind: worth a warning and a metric).
#[derive(Debug, Default)]
struct Watchdog {
    next_look: Option<Instant>,
    /// Shapes seen fitting at the latest look, and since when.
    fitting_since: BTreeMap<String, Instant>,
    found: Vec<Stuck>,
    found_total: u64,
}

/// The counts and memories behind the answers; see the module documentation.
pub(crate) struct Observer {
    started: Instant,
    /// Function tasks held, by `(order, id)`: listings walk it newest first.
    order: BTreeSet<(u64, TaskId)>,
    next_order: u64,
    /// Function tasks held that have ended.
    ended_held: u64,
    result_bytes: u64,
    jobs: HashMap<SessionId, JobCounts>,
    functions: BTreeMap<String, FunctionFigures>,
    /// Function tasks whose records were freed, by `(order, id)`, the newest
    /// [`ENDED_TASKS_KEPT`]: the freed record itself (moved, not copied: freeing costs no
    /// allocation), its value dropped.
    ended: BTreeMap<(u64, TaskId), Remembered>,
    /// The keys of `ended` in the order the records were freed: the first freed goes first,
    /// so a long task submitted early is remembered as long as one that just ran.
    freed: VecDeque<(u64, TaskId)>,
    /// Task → its key in `ended`.
    ended_index: HashMap<TaskId, u64>,
    watchdog: Watchdog,
}

impl Observer {
    pub(crate) fn new(now: Instant) -> Observer {
        Observer {
            started: now,
            order: BTreeSet::new(),
            next_order: 0,
            ended_held: 0,
            result_bytes: 0,
            jobs: HashMap::new(),
            functions: BTreeMap::new(),
            ended: BTreeMap::new(),
            freed: VecDeque::new(),
            ended_index: HashMap::new(),
            watchdog: Watchdog::default(),
        }
    }

    /// Filled in from the records by [`HeadCore::recount`] after a restore.
    pub(crate) fn restored() -> Observer {
        Observer::new(crate::snapshot::restored_at())
    }

    pub(crate) fn result_bytes(&self) -> u64 {
        self.result_bytes
    }

    fn function(&mut self, name: &str) -> &mut FunctionFigures {
        if !self.functions.contains_key(name)
            && (self.functions.len() >= MAX_FUNCTION_LABELS || name.len() > MAX_FUNCTION_LABEL)
        {
            return self.functions.entry(OTHER_FUNCTIONS.to_string()).or_default();
        }
        if !self.functions.contains_key(name) {
            self.functions.insert(name.to_string(), FunctionFigures::default());
        }
        self.functions.get_mut(name).expect("inserted above")
    }

    /// A record was made.
    /// `job_open`: the record's job is a connected driver (a job id in a submission is the
    /// peer's word; only open sessions get counts, which go when they close).
    fn added(&mut self, task: TaskId, record: &mut TaskRecord, job_open: bool) {
        record.order = self.next_order;
        self.next_order += 1;
        if !matches!(record.kind, TaskKind::Function) {
            return;
        }
        self.order.insert((record.order, task));
        if job_open {
            let job = self.jobs.entry(record.job).or_default();
            job.submitted += 1;
            job.unfinished += 1;
        }
        let bypassed = record.bypass.is_some();
        let figures = self.function(&record.function);
        figures.counts.submitted += 1;
        figures.counts.bypassed += u64::from(bypassed);
    }

    /// A record gets its outcome (called before it is stored).
    pub(crate) fn settled(&mut self, now: Instant, record: &TaskRecord, outcome: &Outcome) {
        if record.outcome.is_some() {
            return;
        }
        if let Outcome::Value(value) = outcome {
            self.result_bytes += value.len() as u64;
        }
        if !matches!(record.kind, TaskKind::Function) {
            return;
        }
        self.ended_held += 1;
        if let Some(job) = self.jobs.get_mut(&record.job) {
            job.unfinished = job.unfinished.saturating_sub(1);
        }
        let ran = record.runs.last().map(|run| now.saturating_duration_since(run.sent));
        let figures = self.function(&record.function);
        match outcome {
            Outcome::Value(_) => figures.counts.finished += 1,
            Outcome::Failed(TaskError::Cancelled { .. }) => figures.counts.cancelled += 1,
            Outcome::Failed(_) => figures.counts.failed += 1,
        }
        if let Some(ran) = ran {
            figures.running.observe(ran);
        }
    }

    /// A record was freed (or dropped before it ended, with its driver).
    fn removed(&mut self, task: TaskId, mut record: TaskRecord) {
        let result_bytes = match &mut record.outcome {
            Some(Outcome::Value(value)) => {
                self.result_bytes = self.result_bytes.saturating_sub(value.len() as u64);
                let len = value.len() as u64;
                *value = Vec::new();
                Some(len)
            }
            _ => None,
        };
        if !matches!(record.kind, TaskKind::Function) {
            return;
        }
        self.order.remove(&(record.order, task));
        if record.outcome.is_some() {
            self.ended_held = self.ended_held.saturating_sub(1);
        } else {
            if let Some(job) = self.jobs.get_mut(&record.job) {
                job.unfinished = job.unfinished.saturating_sub(1);
            }
            self.function(&record.function).counts.cancelled += 1;
            // Its driver left before it ran: remembered as cancelled, which is what it was.
            let function = record.function.clone();
            record.outcome = Some(Outcome::Failed(TaskError::Cancelled { function }));
        }
        record.args = Vec::new();
        let key = (record.order, task);
        if self.ended.insert(key, Remembered { record, result_bytes }).is_none() {
            self.freed.push_back(key);
        }
        self.ended_index.insert(task, key.0);
        while self.freed.len() > ENDED_TASKS_KEPT {
            let Some(oldest) = self.freed.pop_front() else { break };
            self.ended.remove(&oldest);
            if self.ended_index.get(&oldest.1) == Some(&oldest.0) {
                self.ended_index.remove(&oldest.1);
            }
        }
    }

    /// The remembered ended task `task`, if any.
    fn remembered(&self, task: TaskId) -> Option<&Remembered> {
        let &order = self.ended_index.get(&task)?;
        self.ended.get(&(order, task))
    }

    /// A function task was sent to a node.
    pub(crate) fn dispatched(&mut self, now: Instant, record: &mut TaskRecord, attempt: u32, node: &str) {
        if let Some(run) = record.runs.last_mut()
            && run.ended.is_none()
        {
            run.ended = Some((now, "sent again".to_string()));
        }
        // Most tasks run once: no room for more until a second run.
        record.runs.reserve_exact(1);
        record.runs.push(Run { attempt, node: node.into(), sent: now, started: None, ended: None });
        let queued = now.saturating_duration_since(record.submitted_at);
        let figures = self.function(&record.function);
        if attempt <= 1 {
            figures.queued.observe(queued);
        } else {
            figures.counts.retried += 1;
        }
    }

    pub(crate) fn session_closed(&mut self, session: SessionId) {
        self.jobs.remove(&session);
    }
}

/// The node acknowledged the current run.
pub(crate) fn run_started(now: Instant, record: &mut TaskRecord) {
    if let Some(run) = record.runs.last_mut()
        && run.started.is_none()
    {
        run.started = Some(now);
    }
}

/// The current run ended.
pub(crate) fn run_ended(now: Instant, record: &mut TaskRecord, end: RunEnd) {
    let Some(run) = record.runs.last_mut().filter(|run| run.ended.is_none()) else { return };
    let text = match end {
        RunEnd::Reported(Outcome::Value(_)) => "finished".to_string(),
        RunEnd::Reported(Outcome::Failed(error)) => error.to_string(),
        RunEnd::Cancelled => "cancelled".to_string(),
        RunEnd::WorkerLost => format!("lost with its worker {}", run.node),
    };
    run.ended = Some((now, truncated(text)));
}

/// `text`, cut to [`MAX_KEPT_TEXT`] bytes (at a character boundary) with a mark.
fn truncated(mut text: String) -> String {
    if text.len() > MAX_KEPT_TEXT {
        let mut end = MAX_KEPT_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [...]");
    }
    text
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The state an ended task's outcome says.
fn ended_state(outcome: &Outcome) -> TaskState {
    match outcome {
        Outcome::Value(_) => TaskState::Finished,
        Outcome::Failed(TaskError::Cancelled { .. }) => TaskState::Cancelled,
        Outcome::Failed(_) => TaskState::Failed,
    }
}

impl HeadCore {
    /// Makes a task record: numbers it in submission order and counts it.
    pub(crate) fn add_record(&mut self, task: TaskId, mut record: TaskRecord) {
        record.submitted_at = self.now;
        let job_open = self.sessions.contains_key(&record.job);
        self.observer.added(task, &mut record, job_open);
        self.tasks.insert(task, record);
    }

    /// Frees a task record; a function task's is remembered for a while.
    pub(crate) fn remove_record(&mut self, task: TaskId) {
        if let Some(record) = self.tasks.remove(&task) {
            self.observer.removed(task, record);
        }
    }

    fn remembered_view(&self, task: TaskId, remembered: &Remembered, detail: bool) -> TaskView {
        TaskView { result_bytes: remembered.result_bytes, ..self.view_of(task, &remembered.record, detail) }
    }

    /// Takes the counts of what the head holds again from its records (after a recovery);
    /// the totals start from zero.
    pub(crate) fn recount(&mut self) {
        let mut observer = Observer::new(self.now);
        // Numbered again in the order they had (by id where a snapshot of a head that did not
        // number them has them all at 0): numbers stay unique across restores.
        let mut records: Vec<(u64, TaskId)> = self.tasks.iter().map(|(&task, r)| (r.order, task)).collect();
        records.sort_unstable();
        for (order, (_, task)) in records.into_iter().enumerate() {
            let Some(record) = self.tasks.get_mut(&task) else { continue };
            record.order = order as u64;
            if let Some(Outcome::Value(value)) = &record.outcome {
                observer.result_bytes += value.len() as u64;
            }
            if !matches!(record.kind, TaskKind::Function) {
                continue;
            }
            observer.order.insert((record.order, task));
            if self.sessions.contains_key(&record.job) {
                let job = observer.jobs.entry(record.job).or_default();
                job.submitted += 1;
                job.unfinished += u64::from(record.outcome.is_none());
            }
            observer.ended_held += u64::from(record.outcome.is_some());
        }
        observer.next_order = self.tasks.len() as u64;
        self.observer = observer;
    }

    /// The counts kept as records come and go agree with a walk of the records.
    pub(crate) fn check_observed_counts(&self) -> Result<(), String> {
        let functions = self.tasks.values().filter(|r| matches!(r.kind, TaskKind::Function));
        let (mut held, mut ended) = (0, 0);
        for record in functions {
            held += 1;
            ended += u64::from(record.outcome.is_some());
        }
        let bytes: u64 = self
            .tasks
            .values()
            .map(|r| match &r.outcome {
                Some(Outcome::Value(value)) => value.len() as u64,
                _ => 0,
            })
            .sum();
        let observer = &self.observer;
        let mut orders: Vec<u64> = self.tasks.values().map(|r| r.order).collect();
        orders.sort_unstable();
        if let Some(twice) = orders.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(format!("two task records have the order {}", twice[0]));
        }
        if held != observer.order.len() || ended != observer.ended_held || bytes != observer.result_bytes {
            return Err(format!(
                "the head counts {} function records, {} ended and {} result bytes, but holds {held}, {ended} and {bytes}",
                observer.order.len(),
                observer.ended_held,
                observer.result_bytes
            ));
        }
        Ok(())
    }

    /// The state of a held record.
    fn state_of(&self, task: TaskId, record: &TaskRecord) -> TaskState {
        if let Some(outcome) = &record.outcome {
            return ended_state(outcome);
        }
        if record.running_on.is_some() {
            return TaskState::Running;
        }
        match self.scheduler.task_status(task) {
            Some(TaskStatus::Queued) => TaskState::Queued,
            Some(TaskStatus::Running { .. }) => TaskState::Running,
            _ => TaskState::Waiting,
        }
    }

    /// The node a task runs on, or its last run ran on.
    fn node_of<'a>(&'a self, record: &'a TaskRecord) -> Option<&'a str> {
        record
            .running_on
            .and_then(|node| self.nodes.get(&node))
            .and_then(|session| self.session_name(*session))
            .or_else(|| record.runs.last().map(|run| &*run.node))
    }

    fn view_of(&self, task: TaskId, record: &TaskRecord, detail: bool) -> TaskView {
        let now = self.now;
        let node = self.node_of(record).map(str::to_string);
        let attempts = if detail {
            record
                .runs
                .iter()
                .map(|run| AttemptView {
                    attempt: run.attempt,
                    node: run.node.to_string(),
                    sent_ms_ago: ms(now.saturating_duration_since(run.sent)),
                    started_ms_ago: run.started.map(|at| ms(now.saturating_duration_since(at))),
                    ended_ms_ago: run.ended.as_ref().map(|(at, _)| ms(now.saturating_duration_since(*at))),
                    outcome: run.ended.as_ref().map(|(_, text)| text.clone()),
                })
                .collect()
        } else {
            Vec::new()
        };
        let waiting_for = if detail {
            record
                .deps
                .iter()
                .copied()
                .filter(|dep| self.tasks.get(dep).is_some_and(|r| r.outcome.is_none()))
                .collect()
        } else {
            Vec::new()
        };
        TaskView {
            task,
            function: record.function.clone(),
            tag: record.tag.clone(),
            job: record.job,
            job_name: self.session_name(record.job).map(str::to_string),
            state: self.state_of(task, record),
            submitted_ms_ago: ms(now.saturating_duration_since(record.submitted_at)),
            node,
            bypassed: record
                .bypass
                .as_ref()
                .map(|b| b.provider.clone().unwrap_or_else(|| "data".to_string())),
            argument_bytes: record.argument_bytes,
            result_bytes: match &record.outcome {
                Some(Outcome::Value(value)) => Some(value.len() as u64),
                _ => None,
            },
            error: match &record.outcome {
                Some(Outcome::Failed(error)) => Some(error.to_string()),
                _ => None,
            },
            attempts,
            waiting_for,
        }
    }

    /// Answers `asker`'s question about the cluster (the asker is left out of the jobs: a
    /// `chia` command is a driver session too).
    pub fn answer(&self, asker: SessionId, query: &Query) -> Answer {
        match query {
            Query::Status => Answer::Status(Box::new(self.status_for(Some(asker)))),
            Query::Tasks(filter) => match self.list_tasks(filter) {
                Ok(page) => Answer::Tasks(page),
                Err(reason) => Answer::Refused { reason },
            },
            Query::Nodes => Answer::Nodes(self.node_views()),
            Query::Services => Answer::Services(self.service_views()),
            Query::Jobs => Answer::Jobs(self.job_views(Some(asker))),
            Query::Task(task) => Answer::Task(self.task_view(*task).map(Box::new)),
            Query::Service { name, namespace } => Answer::Service(
                self.service_views().into_iter().find(|s| &s.name == name && &s.namespace == namespace),
            ),
            Query::Explain(task) => Answer::Explain(self.explain(*task)),
        }
    }

    fn task_view(&self, task: TaskId) -> Option<TaskView> {
        match self.tasks.get(&task) {
            Some(record) => Some(self.view_of(task, record, true)),
            None => {
                self.observer.remembered(task).map(|remembered| self.remembered_view(task, remembered, true))
            }
        }
    }

    /// The cluster in one answer; costs a look at each node and each shape with queued tasks.
    pub fn status(&self) -> ClusterStatus {
        self.status_for(None)
    }

    fn status_for(&self, asker: Option<SessionId>) -> ClusterStatus {
        let counts = self.scheduler.state_counts();
        let totals = self.observer.functions.values().fold(TaskTotals::default(), |mut totals, f| {
            totals += f.counts;
            totals
        });
        ClusterStatus {
            head_up_ms: ms(self.now.saturating_duration_since(self.observer.started)),
            nodes: self.node_views(),
            demand: self.demand(),
            tasks: TaskCounts {
                // With the tasks that wait for service calls, which the scheduler has not seen.
                waiting: (counts.waiting + self.services.deferred.len()) as u64,
                queued: counts.queued as u64,
                running: counts.running as u64,
                ended: self.observer.ended_held,
            },
            totals,
            services: self.services.running_count(),
            jobs: self.sessions.iter().filter(|&(&id, s)| s.node.is_none() && Some(id) != asker).count(),
            result_bytes: self.observer.result_bytes,
            stuck: self.observer.watchdog.found.clone(),
        }
    }

    /// What the metrics endpoint serves of the head.
    pub fn metrics(&self) -> Metrics {
        let status = self.status();
        Metrics {
            head_up: self.now.saturating_duration_since(self.observer.started),
            functions: self.observer.functions.clone(),
            demand: status.demand,
            counts: status.tasks,
            nodes: status.nodes,
            services: status.services,
            jobs: status.jobs,
            result_bytes: status.result_bytes,
            stuck_found: self.observer.watchdog.found_total,
            stuck_now: self.observer.watchdog.found.len(),
        }
    }

    fn age_of(&self, task: Option<TaskId>) -> u64 {
        task.and_then(|t| self.tasks.get(&t))
            .map_or(0, |record| ms(self.now.saturating_duration_since(record.submitted_at)))
    }

    fn demand(&self) -> Vec<Demand> {
        self.scheduler
            .demand()
            .into_iter()
            .map(|shape| Demand {
                function: shape.function.name,
                request: shape.request,
                queued: shape.queued as u64,
                oldest_ms_ago: self.age_of(shape.oldest),
                infeasible: shape.infeasible,
            })
            .collect()
    }

    fn node_views(&self) -> Vec<NodeView> {
        let prefix = crate::scheduler::SERVICE_FUNCTION_PREFIX;
        self.scheduler
            .nodes_overview()
            .into_iter()
            .map(|node| {
                let session = self.nodes.get(&node.id).and_then(|s| self.sessions.get(s));
                let mut used = node.capacity.clone();
                used.take(&node.free);
                let (services, functions): (Vec<_>, Vec<_>) =
                    node.functions.into_iter().partition(|key| key.name.starts_with(prefix));
                NodeView {
                    name: node.name,
                    address: session.and_then(|s| s.address.clone()),
                    up_ms: session.map_or(0, |s| ms(self.now.saturating_duration_since(s.opened))),
                    last_heard_ms_ago: ms(self.now.saturating_duration_since(node.heard)),
                    total: node.capacity,
                    used,
                    free: node.free,
                    running: node.running as u64,
                    functions: functions.into_iter().map(|key| key.name).collect(),
                    service_types: services
                        .into_iter()
                        .map(|key| key.name.trim_start_matches(prefix).to_string())
                        .collect(),
                    paused: node.paused,
                    figures: session.and_then(|s| s.figures.as_deref().cloned()),
                    labels: node.labels,
                    bundles: node.bundles as u64,
                }
            })
            .collect()
    }

    fn job_views(&self, asker: Option<SessionId>) -> Vec<JobView> {
        let mut jobs: Vec<JobView> = self
            .sessions
            .iter()
            .filter(|&(&id, s)| s.node.is_none() && Some(id) != asker)
            .map(|(&job, session)| {
                let counts = self.observer.jobs.get(&job).copied().unwrap_or_default();
                JobView {
                    job,
                    name: session.name.clone(),
                    up_ms: ms(self.now.saturating_duration_since(session.opened)),
                    unfinished: counts.unfinished,
                    submitted: counts.submitted,
                }
            })
            .collect();
        jobs.sort_by_key(|job| std::cmp::Reverse(job.job));
        jobs
    }

    /// A page of tasks, newest first: held records and remembered ended ones, merged by
    /// submission order, looking at no more than [`SCAN_PER_PAGE`] of them.
    fn list_tasks(&self, filter: &TaskFilter) -> Result<TaskPage, String> {
        let tag = match &filter.tag {
            Some(pattern) if pattern.len() > MAX_PATTERN => {
                return Err(format!("a tag pattern of {} bytes is longer than {MAX_PATTERN}", pattern.len()));
            }
            Some(pattern) => Some(TagPatterns::new([pattern.as_str()]).map_err(|e| e.to_string())?),
            None => None,
        };
        let limit = filter.limit.clamp(1, MAX_PAGE);
        let below = filter.after.unwrap_or(u64::MAX);
        let mut held = self.observer.order.range(..(below, TaskId(0))).rev().peekable();
        let mut ended = self.observer.ended.range(..(below, TaskId(0))).rev().peekable();
        // On the record, before any view is built: most of a large listing fails here.
        let matches = |task: TaskId, record: &TaskRecord| {
            filter.function.as_ref().is_none_or(|f| &record.function == f)
                && filter.job.is_none_or(|job| record.job == job)
                && filter.state.is_none_or(|state| self.state_of(task, record) == state)
                && filter.node.as_ref().is_none_or(|node| self.node_of(record) == Some(node.as_str()))
                && tag.as_ref().is_none_or(|t| record.tag.as_deref().is_some_and(|tag| t.matches(tag)))
        };
        let mut page = TaskPage::default();
        let mut scanned = 0;
        loop {
            let take_held = match (held.peek(), ended.peek()) {
                (Some(&&(h, _)), Some(&(&(e, _), _))) => h > e,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return Ok(page),
            };
            let (order, task, record, result_bytes) = if take_held {
                let &(order, task) = held.next().expect("peeked");
                let Some(record) = self.tasks.get(&task) else { continue };
                (order, task, record, None)
            } else {
                let (&(order, task), remembered) = ended.next().expect("peeked");
                (order, task, &remembered.record, Some(remembered.result_bytes))
            };
            scanned += 1;
            if matches(task, record) {
                let view = self.view_of(task, record, false);
                page.tasks.push(match result_bytes {
                    Some(result_bytes) => TaskView { result_bytes, ..view },
                    None => view,
                });
                if page.tasks.len() >= limit {
                    let more = held.peek().is_some() || ended.peek().is_some();
                    page.next = more.then_some(order);
                    return Ok(page);
                }
            }
            if scanned >= SCAN_PER_PAGE {
                page.next = Some(order);
                return Ok(page);
            }
        }
    }

    /// Why `task` is where it is.
    pub fn explain(&self, task: TaskId) -> Explanation {
        let Some(record) = self.tasks.get(&task) else {
            let ended = self
                .observer
                .remembered(task)
                .map(|remembered| self.remembered_view(task, remembered, false));
            return Explanation {
                task,
                state: ended.as_ref().map(|view| view.state),
                reasons: vec![match &ended {
                    Some(view) => Reason::Ended { state: view.state, error: view.error.clone() },
                    None => Reason::Unknown,
                }],
            };
        };
        let state = self.state_of(task, record);
        let mut reasons = Vec::new();
        if let TaskKind::ServiceCall { name, .. } = &record.kind
            && record.outcome.is_none()
        {
            reasons.push(Reason::WaitingForService { service: name.clone() });
        }
        match state {
            TaskState::Running => {
                let node = self.view_of(task, record, false).node.unwrap_or_default();
                reasons.push(Reason::Running { node, attempt: record.attempt });
            }
            TaskState::Finished | TaskState::Failed | TaskState::Cancelled => reasons.push(Reason::Ended {
                state,
                error: match &record.outcome {
                    Some(Outcome::Failed(error)) => Some(error.to_string()),
                    _ => None,
                },
            }),
            TaskState::Waiting => {
                let tasks: Vec<TaskId> = record
                    .deps
                    .iter()
                    .copied()
                    .filter(|dep| self.tasks.get(dep).is_some_and(|r| r.outcome.is_none()))
                    .collect();
                reasons.push(Reason::WaitingFor { tasks });
            }
            TaskState::Queued => {
                reasons.extend(self.scheduler.explain_queued(task, NODES_EXPLAINED).unwrap_or_default())
            }
        }
        Explanation { task, state: Some(state), reasons }
    }

    /// Cancels what `target` names, whoever submitted it: a job's unfinished tasks at most
    /// [`CANCEL_BATCH`] at a time (the answer says if more are left), so one input does a
    /// bounded amount of work.
    pub(crate) fn cancel_tasks(
        &mut self,
        target: &CancelTarget,
        force: bool,
        stop_services: bool,
    ) -> Cancelled {
        let mut answer = Cancelled::default();
        match *target {
            CancelTarget::Task(task) => {
                if self.cancel(task, force) {
                    answer.tasks.push(task);
                } else if self.tasks.get(&task).is_some_and(|r| r.outcome.is_some())
                    || self.observer.remembered(task).is_some()
                {
                    answer.already_ended = 1;
                }
            }
            CancelTarget::Job(job) => {
                // A rare request: it may look at every record, but cancels a batch.
                let mut unfinished: Vec<TaskId> = self
                    .tasks
                    .iter()
                    .filter(|(_, r)| {
                        r.job == job && matches!(r.kind, TaskKind::Function) && r.outcome.is_none()
                    })
                    .map(|(&t, _)| t)
                    .collect();
                unfinished.sort_unstable();
                answer.more = unfinished.len() > CANCEL_BATCH;
                for task in unfinished.into_iter().take(CANCEL_BATCH) {
                    if self.cancel(task, force) {
                        answer.tasks.push(task);
                    }
                }
                if stop_services && !answer.more {
                    answer.services = self.service_views_of(job);
                    self.stop_services_of(job);
                }
            }
        }
        answer
    }

    /// When the watchdog looks next: only while tasks are queued.
    pub(crate) fn watchdog_deadline(&self) -> Option<Instant> {
        if self.scheduler.queued_len() == 0 && self.observer.watchdog.found.is_empty() {
            return None;
        }
        Some(self.observer.watchdog.next_look.unwrap_or(self.now))
    }

    /// The watchdog's look, when its deadline passed: shapes a node has room for now stay
    /// stuck while they are seen so, and one seen so for `stuck_after` is reported once.
    pub(crate) fn watchdog_look(&mut self, now: Instant) {
        let stuck_after = self.options.stuck_after;
        if self.observer.watchdog.next_look.is_some_and(|at| at > now) {
            return;
        }
        self.observer.watchdog.next_look = Some(now + (stuck_after / 4).max(Duration::from_secs(1)));
        let mut fitting = BTreeMap::new();
        let mut found = Vec::new();
        for shape in self.scheduler.demand() {
            let Some(node) = shape.fits_on else { continue };
            let key = format!("{} {}", shape.function, shape.request);
            let since = self.observer.watchdog.fitting_since.get(&key).copied().unwrap_or(now);
            fitting.insert(key.clone(), since);
            let oldest = self.age_of(shape.oldest);
            if now.saturating_duration_since(since) < stuck_after || oldest < ms(stuck_after) {
                continue;
            }
            let new = !self
                .observer
                .watchdog
                .found
                .iter()
                .any(|s| s.function == shape.function.name && s.request == shape.request);
            if new {
                self.observer.watchdog.found_total += 1;
                tracing::warn!(
                    function = %shape.function.name,
                    request = %shape.request,
                    node = %node,
                    queued = shape.queued,
                    "{} task(s) of {} have waited {:.0?} although {node} has the function and room for {}; they were not placed",
                    shape.queued,
                    shape.function.name,
                    Duration::from_millis(oldest),
                    shape.request
                );
            }
            found.push(Stuck {
                function: shape.function.name,
                request: shape.request,
                queued: shape.queued as u64,
                oldest_ms_ago: oldest,
                fits_on: node,
            });
        }
        self.observer.watchdog.fitting_since = fitting;
        self.observer.watchdog.found = found;
    }
}

/// Bytes of the arguments given as values.
pub(crate) fn value_bytes(args: &[Arg]) -> u64 {
    args.iter()
        .map(|arg| match arg {
            Arg::Value(value) => value.len() as u64,
            Arg::Ref(_) => 0,
        })
        .sum()
}
