//! The simulated cluster around one real [`HeadCore`]: connections and their ordered lanes,
//! the event loop on a virtual clock, faults, and the invariants that span more than one
//! peer (leases, attempts, who is told what, service names, and the idle cluster at the end).

use super::driver::{DriverTimer, Habits, SimDriver};
use super::groups::{self, GroupModel};
use super::model::{self, Catalog, WATCH_METHOD};
use super::net::{Lane, Micros, Queue};
use super::rng::{Rng, mix64};
use super::worker::{Effects, Link, Placement, SimWorker, WorkerTimer};
use super::{Config, Failure, Report};
use crate::journal::JournalEntry;
use crate::outbox::Action;
use crate::scheduler::GroupStatus;
use crate::{CoreOptions, HeadCore};
use chia_core::placement::{GroupId, GroupProblem};
use chia_core::protocol::{
    ArgValue, Done, HeadToPeer, JobSettings, Outcome, PeerToHead, ServiceInfo, TaskAttempt,
};
use chia_core::{Resources, ServiceId, SessionId, TaskError, TaskId};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// The owner of the head's own tasks (service restarts).
const HEAD_SESSION: SessionId = SessionId(0);

/// Frames at least this large take long enough to arrive that the head hears their first
/// bytes before the whole frame ([`HeadCore::heard`]).
const LARGE_FRAME: usize = 64 << 10;
/// How often (per mille) a group commit also compacts the journal to a snapshot.
const COMPACTIONS_PER_MILLE: u32 = 20;
/// How many traced events a failure reports at most (the last ones).
const TRACE_LINES: usize = 4_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Worker(usize),
    Driver(usize),
}

struct Conn {
    peer: Peer,
    session: Option<SessionId>,
    /// The head holds the session open.
    open: bool,
    /// The connection is gone (the peer crashed, or the head did): nothing more travels on it
    /// either way.
    cut: bool,
    /// A `Resume` was sent on it and not answered yet: its first frame opens no new session.
    resuming: bool,
    /// The name the head gave the worker on it.
    node_name: Option<String>,
    to_head: Lane,
    to_peer: Lane,
}

#[derive(Debug)]
enum Event {
    ToHead {
        conn: usize,
        /// Boxed: events move in the queue's heap, and messages are large.
        message: Box<PeerToHead>,
    },
    /// The first bytes of a large frame arrived.
    Heard {
        conn: usize,
    },
    ToPeer {
        conn: usize,
        message: Box<HeadToPeer>,
    },
    /// The head closed the connection: after what it sent before, the peer learns it is gone.
    ClosedByHead {
        conn: usize,
    },
    Worker {
        slot: usize,
        life: u32,
        timer: WorkerTimer,
    },
    Driver {
        index: usize,
        timer: DriverTimer,
    },
    StartDriver {
        index: usize,
    },
    Fault,
    Thaw {
        slot: usize,
        freeze: u64,
    },
    /// What the head kept so far is durable (one group commit).
    Commit,
    /// The head process starts again and recovers from the durable journal.
    HeadRestart,
    /// A peer notices that its connection to the head is gone and dials the head again.
    Reconnect {
        peer: Peer,
        conn: usize,
    },
}

/// A frame or close the head decided after something not yet durable: it waits for the commit.
enum Held {
    Frame {
        conn: usize,
        message: Box<HeadToPeer>,
        undo: Undo,
    },
    /// `leases`: the runs the close took from the session, given back if it never happens.
    Close {
        conn: usize,
        session: SessionId,
        leases: Vec<TaskId>,
    },
}

/// What the simulator recorded when a frame was decided, to forget if the frame never leaves
/// (the head crashed before its cause was durable).
enum Undo {
    Nothing,
    Execute { task: TaskId, attempt: Option<u32>, lease: Option<usize> },
    Write { task: TaskId },
    Named(HashMap<String, ServiceId>),
}

/// The latest run of a task a worker was given.
struct RunRecord {
    session: SessionId,
    attempt: u32,
    /// It failed with an application error: a retry may run it again.
    failed: bool,
}

impl Event {
    /// Messages that count for "the network is quiet": everything but heartbeats.
    fn busy(&self) -> bool {
        match self {
            Event::ToHead { message, .. } => !matches!(**message, PeerToHead::Heartbeat),
            Event::ToPeer { .. } | Event::ClosedByHead { .. } | Event::Commit => true,
            _ => false,
        }
    }
}

/// What the simulator recorded of a service instance when it was first placed.
struct ServiceMeta {
    request: Resources,
}

pub(super) struct World {
    cfg: Config,
    /// The last events that mention [`Config::trace`], for the failure's report.
    trace: VecDeque<String>,
    catalog: Catalog,
    base: Instant,
    now: Micros,
    step: u64,
    head: HeadCore,
    queue: Queue<Event>,
    conns: Vec<Conn>,
    sessions: HashMap<SessionId, usize>,
    workers: Vec<SimWorker>,
    /// Events of frozen workers, in arrival order, run when they thaw; with the freeze's number.
    frozen: Vec<Option<(u64, VecDeque<Event>)>>,
    freezes: u64,
    drivers: Vec<SimDriver>,
    habits: Habits,
    net: Rng,
    faults_rng: Rng,
    /// Tasks not submitted yet.
    budget: u64,
    /// Every task is submitted: the run ends once the cluster is idle. Drivers are no longer
    /// crashed (a driver that waits for an answer that never comes must not be hidden by
    /// its death), and workers only until `faults_until`.
    draining: bool,
    faults_until: Micros,
    /// The last time a driver was answered: a drain that answers nobody for long has lost a
    /// task (placements alone are no progress: a task may be retried without end).
    last_progress: Micros,
    unfinished_drivers: usize,
    /// Messages (not heartbeats) in flight.
    busy: usize,
    /// The worker connection each task was last sent to, until it reports or is closed.
    leases: HashMap<TaskId, usize>,
    attempts: HashMap<TaskId, u32>,
    /// The attempts of each task its worker acknowledged to the head while leased: no more
    /// than the task may run.
    acknowledged: HashMap<TaskId, BTreeSet<u32>>,
    services: HashMap<ServiceId, ServiceMeta>,
    /// Results workers reported for tagged tasks, `(tag, digest)` → function.
    tagged_results: HashMap<(String, u64), usize>,
    /// Writes of results to watchers the head sent and their hosts have not answered, by the
    /// head's task for the write: `((tag, digest), host connection)`.
    writes: HashMap<TaskId, ((String, u64), usize)>,
    pending_writes: HashMap<(String, u64), usize>,
    /// The newest instance the head named for each `namespace/name`.
    named: HashMap<String, ServiceId>,
    /// What the open worker sessions offer: function name → signature → nodes.
    offered: HashMap<String, BTreeMap<String, usize>>,
    /// Open worker sessions that offer some function (not only services).
    task_nodes: usize,
    open_workers: usize,
    open_sessions: usize,
    fx_worker: Effects<WorkerTimer>,
    fx_driver: Effects<DriverTimer>,
    next_sweep: u64,
    /// When to look again whether every worker is joined and idle, once the rest is quiet.
    next_settled_check: u64,
    /// The head's timer deadline, as of its latest input: it changes only when the head is fed.
    deadline: Option<Option<Micros>>,
    report: Report,
    options: CoreOptions,
    /// Every `Action::Keep` of the head, in order (with head crashes only).
    journal: Vec<JournalEntry>,
    /// How much of the journal is durable.
    durable: usize,
    /// Actions waiting for the journal to be durable, in order.
    held: VecDeque<Held>,
    /// The last message of each session the pending journal entries keep.
    through: BTreeMap<SessionId, u64>,
    commit_scheduled: bool,
    /// The head crashed and has not started again.
    head_down: bool,
    /// Sessions that ended (closed by the head, or their worker died).
    ended: HashSet<SessionId>,
    runs: HashMap<TaskId, RunRecord>,
    /// Writes to watchers their host received.
    writes_delivered: HashSet<TaskId>,
    /// Tasks whose outcome was checked when the head first announced it: announced again
    /// after a restart, it was decided in a cluster that may differ from today's.
    announced: HashSet<TaskId>,
    /// Frames still to come out of the outbox that the head decided before now (the welcome
    /// and the frames it held for a session being taken up), by session: what they say was
    /// true when decided, not necessarily now.
    decided_before: HashMap<SessionId, usize>,
    /// Placement groups drivers created, as seen from outside the scheduler (see `groups`).
    groups: BTreeMap<GroupId, GroupModel>,
    /// The open worker connection of each node name.
    node_conns: HashMap<String, usize>,
    /// Counts the changes of the set of connected nodes.
    node_epoch: u64,
    /// Worker sessions closed in the outbox being drained.
    closes_in_drain: u32,
    /// Dispatches into bundles decided in the outbox being drained: `(task, group, bundle,
    /// worker connection)`, checked once the head's input is carried out.
    group_dispatches: Vec<(TaskId, GroupId, Option<u32>, usize)>,
}

type Step<T = ()> = Result<T, String>;

impl World {
    pub(super) fn new(cfg: &Config) -> World {
        let catalog = Catalog::new();
        let base = Instant::now();
        let options = CoreOptions {
            heartbeat: cfg.heartbeat,
            heartbeat_timeout: cfg.heartbeat_timeout,
            keep_services: false,
            // With head crashes the head keeps a journal, and waits for its peers after a
            // restart longer than it is ever down.
            journal_id: cfg.head_crashes.then_some(1),
            resume_grace: Duration::from_secs(5),
            // Short, so the watchdog looks often: a correct scheduler never leaves a task that
            // fits behind, so any finding fails the run.
            stuck_after: Duration::from_secs(2),
            // The simulated nodes are all peers over connections.
            own_node_in_process: false,
        };
        let workers: Vec<SimWorker> = (0..cfg.workers.max(1))
            .map(|slot| {
                let mut rng = Rng::derive(cfg.seed, 1, slot as u64);
                let offer = catalog.offer(slot, &mut rng);
                SimWorker::new(slot, offer, rng)
            })
            .collect();
        let timeout = cfg.heartbeat_timeout.as_micros() as Micros;
        let habits = Habits {
            window: cfg.window.max(1),
            services: cfg.services,
            constructor_failures: cfg.constructor_failures,
            refs_to_call_results: cfg.refs_to_call_results,
            faults: cfg.faults,
            patience: (4 * timeout).max(1_000_000),
            groups: cfg.groups,
        };
        World {
            frozen: workers.iter().map(|_| None).collect(),
            freezes: 0,
            workers,
            catalog,
            base,
            now: 0,
            step: 0,
            head: HeadCore::new(base, options.clone()),
            options,
            journal: Vec::new(),
            durable: 0,
            held: VecDeque::new(),
            through: BTreeMap::new(),
            commit_scheduled: false,
            head_down: false,
            ended: HashSet::new(),
            runs: HashMap::new(),
            writes_delivered: HashSet::new(),
            announced: HashSet::new(),
            decided_before: HashMap::new(),
            groups: BTreeMap::new(),
            node_conns: HashMap::new(),
            node_epoch: 0,
            closes_in_drain: 0,
            group_dispatches: Vec::new(),
            queue: Queue::new(),
            conns: Vec::new(),
            sessions: HashMap::new(),
            drivers: Vec::new(),
            habits,
            net: Rng::derive(cfg.seed, 2, 0),
            faults_rng: Rng::derive(cfg.seed, 3, 0),
            budget: cfg.tasks,
            draining: false,
            faults_until: Micros::MAX,
            last_progress: 0,
            unfinished_drivers: 0,
            busy: 0,
            leases: HashMap::new(),
            attempts: HashMap::new(),
            acknowledged: HashMap::new(),
            services: HashMap::new(),
            named: HashMap::new(),
            tagged_results: HashMap::new(),
            writes: HashMap::new(),
            pending_writes: HashMap::new(),
            offered: HashMap::new(),
            task_nodes: 0,
            open_workers: 0,
            open_sessions: 0,
            fx_worker: Effects::default(),
            fx_driver: Effects::default(),
            next_sweep: 0,
            next_settled_check: 0,
            deadline: None,
            report: Report { seed: cfg.seed, ..Report::default() },
            trace: VecDeque::new(),
            cfg: cfg.clone(),
        }
    }

    fn instant(&self, at: Micros) -> Instant {
        self.base + Duration::from_micros(at)
    }

    /// `at` in virtual microseconds, rounded up so that "at" is never before it.
    fn micros(&self, at: Instant) -> Micros {
        let nanos = at.saturating_duration_since(self.base).as_nanos();
        nanos.div_ceil(1000) as Micros
    }

    fn fail(&self, message: String) -> Failure {
        Failure {
            seed: self.cfg.seed,
            step: self.step,
            at: Duration::from_micros(self.now),
            message,
            replay: self.cfg.replay(),
            trace: self.trace.iter().cloned().collect(),
        }
    }

    /// Notes `what` for the failure's report when it mentions the traced text (or `always`).
    fn note(&mut self, always: bool, what: impl FnOnce() -> String) {
        let Some(text) = &self.cfg.trace else { return };
        // The step's number is part of the line, so `step 2420:` picks one step.
        let line = format!("step {}: at {} µs: {}", self.step, self.now, what());
        if always || line.contains(text.as_str()) {
            if self.trace.len() == TRACE_LINES {
                self.trace.pop_front();
            }
            self.trace.push_back(line);
        }
    }

    pub(super) fn run(mut self) -> Result<Report, Failure> {
        self.boot();
        let max_steps = self.cfg.max_steps();
        let max_time = self.cfg.max_virtual_time().as_micros() as Micros;
        loop {
            let quiet = self.draining
                && self.unfinished_drivers == 0
                && self.busy == 0
                && !self.head_down
                && self.held.is_empty()
                && self.head.grace_until.is_none();
            if quiet && self.step >= self.next_settled_check {
                if self.workers_settled() {
                    break;
                }
                // A pass over every worker: while the last ones join again, spaced out so that
                // it costs a few steps' worth, not one per step.
                self.next_settled_check = self.step + self.workers.len() as u64 / 16 + 1;
            }
            let stalled = self.draining && self.now > self.last_progress + self.stall_limit();
            if self.step >= max_steps || self.now >= max_time || stalled {
                let message = self.not_draining();
                return Err(self.fail(message));
            }
            self.step += 1;
            let checked = self.advance().and_then(|()| self.check_step());
            checked.map_err(|message| self.fail(message))?;
        }
        self.idle_checks().map_err(|message| self.fail(message))?;
        self.report.steps = self.step;
        self.report.elapsed = Duration::from_micros(self.now);
        self.report.tasks = self.drivers.iter().map(|d| d.submitted).sum();
        self.report.outcomes = self.drivers.iter().map(|d| d.outcomes).sum();
        Ok(self.report)
    }

    /// How long a draining run may go without answering a driver: longer
    /// than anything the model lets take (the slowest task, a freeze, a restart, a driver's
    /// patience with an infeasible task).
    fn stall_limit(&self) -> Micros {
        let timeout = self.cfg.heartbeat_timeout.as_micros() as Micros;
        (20 * timeout).max(10_000_000) + self.habits.patience
    }

    fn boot(&mut self) {
        for slot in 0..self.workers.len() {
            let at = self.net.range(0, 50_000);
            let life = self.workers[slot].life;
            self.queue.push(at, Event::Worker { slot, life, timer: WorkerTimer::Restart });
        }
        for _ in 0..self.cfg.drivers.max(1) {
            let at = self.net.range(0, 100_000);
            self.spawn_driver(at);
        }
        if self.cfg.faults {
            let gap = self.fault_gap();
            self.queue.push(gap, Event::Fault);
        }
    }

    fn fault_gap(&mut self) -> Micros {
        let mean = self.cfg.fault_interval.as_micros() as Micros;
        self.faults_rng.range(mean / 2, mean * 3 / 2)
    }

    fn spawn_driver(&mut self, at: Micros) {
        let index = self.drivers.len();
        let conn = self.new_conn(Peer::Driver(index));
        let rng = Rng::derive(self.cfg.seed, 4, index as u64);
        let groups_rng = Rng::derive(self.cfg.seed, 5, index as u64);
        self.drivers.push(SimDriver::new(index, conn, rng, groups_rng, self.habits));
        self.unfinished_drivers += 1;
        self.queue.push(at, Event::StartDriver { index });
    }

    fn new_conn(&mut self, peer: Peer) -> usize {
        self.conns.push(Conn {
            peer,
            session: None,
            open: false,
            cut: false,
            resuming: false,
            node_name: None,
            to_head: Lane::default(),
            to_peer: Lane::default(),
        });
        self.conns.len() - 1
    }

    fn delay(&mut self) -> Micros {
        // Mostly a LAN's latency, now and then a slow path.
        if self.net.chance(50) { self.net.range(2_000, 30_000) } else { self.net.range(50, 2_000) }
    }

    fn send_to_head(&mut self, conn: usize, message: PeerToHead) {
        if self.conns[conn].cut {
            return;
        }
        let mut delay = self.delay();
        if let PeerToHead::Finished { outcome: chia_core::protocol::Outcome::Value(value), .. } = &message
            && value.len() >= LARGE_FRAME
        {
            // About 10 MB/s: the head hears the first bytes long before the frame is whole.
            let transfer = value.len() as Micros / 10;
            self.queue.push(self.now + delay, Event::Heard { conn });
            delay += transfer;
        }
        let at = self.conns[conn].to_head.arrival(self.now, delay);
        let event = Event::ToHead { conn, message: Box::new(message) };
        self.busy += usize::from(event.busy());
        self.queue.push(at, event);
    }

    fn send_to_peer(&mut self, conn: usize, event: Event) {
        let delay = self.delay();
        let at = self.conns[conn].to_peer.arrival(self.now, delay);
        self.busy += usize::from(event.busy());
        self.queue.push(at, event);
    }

    /// One step: the head's timer if it is due first, else the next event.
    fn advance(&mut self) -> Step {
        let next = self.queue.peek_time();
        let deadline = match self.deadline {
            _ if self.head_down => None,
            Some(deadline) => deadline,
            None => *self.deadline.insert(self.head.poll_timeout().map(|t| self.micros(t))),
        };
        if let Some(deadline) = deadline
            && next.is_none_or(|next| deadline <= next)
        {
            self.now = self.now.max(deadline);
            self.head.handle_timeout(self.instant(self.now));
            self.drain_outbox()?;
            if let Some(again) = self.head.poll_timeout().map(|t| self.micros(t))
                && again <= self.now
            {
                return Err(format!(
                    "handle_timeout at {:?} left its deadline in the past ({:?})",
                    Duration::from_micros(self.now),
                    Duration::from_micros(again)
                ));
            }
            return Ok(());
        }
        let Some((at, event)) = self.queue.pop() else {
            return Err("nothing is left to happen, yet the run has not drained".into());
        };
        self.now = at;
        if event.busy() {
            self.busy -= 1;
        }
        self.handle(event)
    }

    fn handle(&mut self, event: Event) -> Step {
        self.note(matches!(event, Event::HeadRestart), || format!("{event:?}"));
        match event {
            Event::ToHead { conn, message } => self.deliver_to_head(conn, *message),
            Event::Heard { conn } => {
                if let Some(session) = self.conns[conn].session.filter(|_| self.conns[conn].open) {
                    self.head.heard(self.instant(self.now), session);
                    self.deadline = None;
                }
                Ok(())
            }
            Event::ToPeer { conn, message } => self.deliver_to_peer(conn, *message),
            Event::ClosedByHead { conn } => match self.conns[conn].peer {
                Peer::Worker(slot) => {
                    if self.frozen[slot].is_some() {
                        self.defer(slot, Event::ClosedByHead { conn });
                    } else if self.workers[slot].conn() == Some(conn) {
                        self.worker_lost_head(slot);
                    }
                    Ok(())
                }
                Peer::Driver(index) => Err(format!("the head closed the connection of driver {index}")),
            },
            Event::Worker { slot, life, timer } => {
                if self.frozen[slot].is_some() {
                    self.defer(slot, Event::Worker { slot, life, timer });
                    return Ok(());
                }
                let worker = &mut self.workers[slot];
                if worker.life != life {
                    return Ok(()); // Set by an earlier life of the process.
                }
                if let WorkerTimer::Restart = timer {
                    if worker.link == Link::Down && self.head_down {
                        // The head cannot be reached: try again later.
                        let later = self.net.range(20_000, 100_000);
                        self.queue.push(self.now + later, Event::Worker { slot, life, timer });
                    } else if worker.link == Link::Down {
                        let conn = self.new_conn(Peer::Worker(slot));
                        let hello = self.workers[slot].start(conn, &self.catalog);
                        self.send_to_head(conn, hello);
                    }
                    return Ok(());
                }
                let mut fx = std::mem::take(&mut self.fx_worker);
                worker.timer(&mut fx, timer);
                self.apply_worker(slot, fx);
                Ok(())
            }
            Event::Driver { index, timer: DriverTimer::Tick } => {
                let mut fx = std::mem::take(&mut self.fx_driver);
                let driver = &mut self.drivers[index];
                let was_finished = driver.finished || driver.dead;
                driver.tick(&mut fx, self.now, &mut self.budget, &self.catalog);
                if !was_finished && driver.finished {
                    if driver.holds_groups() {
                        driver.exit_pending = true;
                    } else {
                        self.unfinished_drivers -= 1;
                    }
                }
                self.apply_driver(index, fx);
                if self.drivers[index].exit_pending {
                    self.exit_driver(index)?;
                }
                if self.budget == 0 && !self.draining {
                    self.draining = true;
                    let timeout = self.cfg.heartbeat_timeout.as_micros() as Micros;
                    self.faults_until = self.now + 10 * timeout;
                }
                Ok(())
            }
            Event::StartDriver { index } => {
                if self.drivers[index].started || self.drivers[index].dead {
                    return Ok(()); // Started by an earlier event of its chain.
                }
                if self.head_down {
                    let later = self.net.range(20_000, 100_000);
                    self.queue.push(self.now + later, Event::StartDriver { index });
                    return Ok(());
                }
                if self.conns[self.drivers[index].conn].cut {
                    // Its connection died with the head before it was used.
                    self.drivers[index].conn = self.new_conn(Peer::Driver(index));
                }
                let hello = self.drivers[index].hello();
                let conn = self.drivers[index].conn;
                self.drivers[index].started = true;
                self.send_to_head(conn, hello);
                Ok(())
            }
            Event::Fault => {
                // Faults go on while there is work they can disturb; the release of what the
                // drivers hold and the idle cluster after it are fault-free.
                let disturbing = self.now < self.faults_until && self.drivers.iter().any(SimDriver::busy);
                if !self.draining || disturbing {
                    self.inject_fault()?;
                    let gap = self.fault_gap();
                    self.queue.push(self.now + gap, Event::Fault);
                }
                Ok(())
            }
            Event::Thaw { slot, freeze } => {
                // A crash during the freeze ended it already; a later freeze has its own thaw.
                if self.frozen[slot].as_ref().is_none_or(|(number, _)| *number != freeze) {
                    return Ok(());
                }
                let Some((_, deferred)) = self.frozen[slot].take() else { return Ok(()) };
                for event in deferred {
                    self.handle(event)?;
                }
                Ok(())
            }
            Event::Commit => self.commit(),
            Event::HeadRestart => self.restart_head(),
            Event::Reconnect { peer, conn } => self.reconnect(peer, conn),
        }
    }

    /// Driver `index` finished with groups left to its job's end: its program ends, so its
    /// session closes and the groups go with its job, while the rest of the run goes on. Tried
    /// again a little later while the head cannot be told (it is down, or the session is being
    /// taken up again).
    fn exit_driver(&mut self, index: usize) -> Step {
        let conn = self.drivers[index].conn;
        let c = &self.conns[conn];
        let Some(session) = c.session.filter(|_| c.open && !c.cut && !c.resuming && !self.head_down) else {
            self.queue.push(self.now + 20_000, Event::Driver { index, timer: DriverTimer::Tick });
            return Ok(());
        };
        let driver = &mut self.drivers[index];
        driver.exit_pending = false;
        driver.exited = true;
        self.unfinished_drivers -= 1;
        self.conns[conn].cut = true;
        self.head.close_session(self.instant(self.now), session, "the program ended");
        self.drain_outbox()?;
        if !self.head.sessions.contains_key(&session) {
            self.session_closed(conn);
        }
        Ok(())
    }

    fn defer(&mut self, slot: usize, event: Event) {
        if let Some((_, queue)) = self.frozen[slot].as_mut() {
            queue.push_back(event);
        }
    }

    fn apply_worker(&mut self, slot: usize, mut fx: Effects<WorkerTimer>) {
        let worker = &self.workers[slot];
        let (conn, life) = (worker.conn(), worker.life);
        for message in fx.sends.drain(..) {
            let Some(conn) = conn else { continue };
            if let PeerToHead::Finished { task, outcome, .. } = &message {
                if self.leases.get(task) == Some(&conn) {
                    self.leases.remove(task);
                }
                if let Some((key, _)) = self.writes.remove(task) {
                    self.write_done(&key);
                }
                if let Outcome::Value(value) = outcome
                    && let Some((function, tag)) = self.owner(*task).and_then(|d| d.tagged(task.seq()))
                {
                    self.tagged_results.insert((tag.to_string(), model::digest(value)), function);
                }
                if let Outcome::Failed(TaskError::Application { .. }) = outcome
                    && let Some(run) = self.runs.get_mut(task)
                {
                    run.failed = true;
                }
            }
            let Some(message) = self.workers[slot].track.outgoing(message) else { continue };
            self.send_to_head(conn, message);
        }
        for (delay, timer) in fx.timers.drain(..) {
            self.queue.push(self.now + delay, Event::Worker { slot, life, timer });
        }
        self.fx_worker = fx;
    }

    fn apply_driver(&mut self, index: usize, mut fx: Effects<DriverTimer>) {
        let conn = self.drivers[index].conn;
        for message in fx.sends.drain(..) {
            self.note(false, || format!("driver {index} sends on conn {conn}: {message:?}"));
            if let PeerToHead::CreateGroup(spec) = &message
                && spec.validate().is_ok()
                && !self.groups.contains_key(&spec.group)
            {
                let model = GroupModel::new(spec.group.0.session(), spec.bundles.clone(), spec.strategy);
                self.groups.insert(spec.group, model);
                self.report.groups.created += 1;
            }
            let Some(message) = self.drivers[index].track.outgoing(message) else { continue };
            let sent = self.drivers[index].track.sent;
            self.note(false, || format!("driver {index} numbered it {sent} on its session"));
            self.send_to_head(conn, message);
        }
        for (delay, timer) in fx.timers.drain(..) {
            self.queue.push(self.now + delay, Event::Driver { index, timer });
        }
        self.fx_driver = fx;
    }

    /// A worker's word that it runs `attempt` of `task` reaches the head: while the task is
    /// leased to it, that attempt counts against the task's retries.
    fn note_acknowledged(&mut self, conn: usize, task: TaskId, attempt: u32) -> Step {
        if attempt == 0 || self.attempts.get(&task) != Some(&attempt) || self.leases.get(&task) != Some(&conn)
        {
            return Ok(());
        }
        let max = self.owner(task).and_then(|owner| owner.max_attempts(task.seq()));
        let acknowledged = self.acknowledged.entry(task).or_default();
        acknowledged.insert(attempt);
        // An acknowledgement the head had not made durable dies with it; only a task that
        // may not be retried is held to its count through a head crash.
        let strict = self.report.faults.head_crashes == 0 || max == Some(1);
        match max {
            Some(max) if strict && acknowledged.len() > max as usize => Err(format!(
                "{task} ran {} times (attempts {acknowledged:?}), but it may run {max} time(s) at most",
                acknowledged.len()
            )),
            _ => Ok(()),
        }
    }

    /// The address connection `conn` comes from: a worker's host is its slot, so a worker
    /// process started again in the slot joins from the same host, as a restarted one does
    /// (and replaces its predecessor, if the head still has it).
    fn remote_of(&self, conn: usize) -> String {
        match self.conns[conn].peer {
            Peer::Worker(slot) => format!("10.0.{}.{}:{}", slot / 250, 1 + slot % 250, 40000 + conn % 20000),
            Peer::Driver(_) => format!("sim-conn-{conn}"),
        }
    }

    fn deliver_to_head(&mut self, conn: usize, message: PeerToHead) -> Step {
        let now = self.instant(self.now);
        let c = &self.conns[conn];
        if c.cut && (c.open || self.head_down) {
            // Lost with its connection (the head crashed, or the session moved on).
            return Ok(());
        }
        if c.resuming {
            if c.cut {
                return Ok(());
            }
            self.conns[conn].resuming = false;
            // Starts the head may decide again, as it would had they come on their own.
            let starts: Vec<TaskId> = match &message {
                PeerToHead::Resume(resume) => {
                    resume.starts.iter().map(|unanswered| unanswered.start.task).collect()
                }
                _ => Vec::new(),
            };
            if let Some(session) = self.conns[conn].session
                && let Some(peer) = self.head.sessions.get(&session)
            {
                self.decided_before.insert(session, 1 + peer.held.len());
            }
            return match self.head.open_session(now, &self.remote_of(conn), message) {
                Ok(session) if Some(session) == self.conns[conn].session => {
                    for task in starts {
                        self.note_service(task);
                    }
                    self.drain_outbox()
                }
                Ok(session) => Err(format!(
                    "a resume on connection {conn} took up {session}, not {:?}",
                    self.conns[conn].session
                )),
                Err(rejection) => {
                    if let Some(session) = self.conns[conn].session {
                        self.decided_before.remove(&session);
                    }
                    self.deadline = None;
                    let message = HeadToPeer::Rejected { reason: rejection.reason };
                    self.send_to_peer(conn, Event::ToPeer { conn, message: Box::new(message) });
                    Ok(())
                }
            };
        }
        match (c.session, c.open) {
            (None, _) if c.cut => Ok(()), // The hello died with its connection.
            (None, _) => {
                let remote = self.remote_of(conn);
                let session = self
                    .head
                    .open_session(now, &remote, message)
                    .map_err(|e| format!("a hello was rejected: {e}"))?;
                let c = &mut self.conns[conn];
                c.session = Some(session);
                c.open = true;
                self.sessions.insert(session, conn);
                self.open_sessions += 1;
                if let Peer::Worker(slot) = c.peer {
                    self.node_opened(slot, 1);
                }
                self.drain_outbox()
            }
            (Some(session), true) => {
                let start = match &message {
                    PeerToHead::StartService(start) => Some(start.task),
                    _ => None,
                };
                if let PeerToHead::Started { task, attempt } | PeerToHead::Finished { task, attempt, .. } =
                    &message
                {
                    self.note_acknowledged(conn, *task, *attempt)?;
                }
                self.head.handle(now, session, message);
                if let Some(task) = start {
                    self.note_service(task);
                }
                self.drain_outbox()
            }
            (Some(session), false) => {
                // A frame from a connection the head closed, decoded before the close took
                // effect (a race the real driver has): it must change nothing.
                if c.cut || !self.net.chance(self.cfg.late_frames_per_mille) {
                    return Ok(());
                }
                self.report.late_frames += 1;
                let what = format!("{message:?}");
                self.head.handle(now, session, message);
                self.deadline = None;
                if let Some(action) = self.head.poll_action() {
                    return Err(format!(
                        "a frame from closed {session} ({}) made the head act: {action:?}",
                        what.chars().take(120).collect::<String>()
                    ));
                }
                Ok(())
            }
        }
    }

    /// The head took start `task` and gave it a service id: what the instance holds, known
    /// before any placement (a head that restarts may place it first where the simulator does
    /// not see it, then restart it under a task of its own).
    fn note_service(&mut self, task: TaskId) {
        let Some(crate::core::TaskKind::ServiceStart(service)) = self.head.tasks.get(&task).map(|r| &r.kind)
        else {
            return;
        };
        let service = *service;
        let request = self.owner(task).and_then(|d| d.start_request(task.seq(), &self.catalog)).cloned();
        if let Some(request) = request {
            self.services.entry(service).or_insert(ServiceMeta { request });
        }
    }

    /// Counts what worker `slot`'s open session offers (`delta` 1 when opened, -1 when closed).
    fn node_opened(&mut self, slot: usize, delta: isize) {
        let keys = self.workers[slot].offer.scheduler_keys(&self.catalog);
        let runs_tasks = !self.workers[slot].offer.function_keys(&self.catalog).is_empty();
        for key in keys {
            let count = self.offered.entry(key.name).or_default().entry(key.sig_hash).or_default();
            *count = count.checked_add_signed(delta).unwrap_or(0);
        }
        self.task_nodes = self.task_nodes.checked_add_signed(if runs_tasks { delta } else { 0 }).unwrap_or(0);
        self.open_workers = self.open_workers.checked_add_signed(delta).unwrap_or(0);
    }

    /// The head no longer holds `conn`'s session (it closed it, or was told it closed).
    fn session_closed(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        if !c.open {
            return;
        }
        c.open = false;
        self.open_sessions -= 1;
        if let Peer::Worker(slot) = c.peer {
            self.node_opened(slot, -1);
        }
        if let Some(name) = self.conns[conn].node_name.clone() {
            self.node_lost(conn, &name);
        }
        // Whatever that node ran may go elsewhere now.
        self.leases.retain(|_, leased| *leased != conn);
        // Writes it was sent end with it: the head fails them.
        let lost: Vec<TaskId> =
            self.writes.iter().filter(|(_, (_, to))| *to == conn).map(|(t, _)| *t).collect();
        for write in lost {
            if let Some((key, _)) = self.writes.remove(&write) {
                self.write_done(&key);
            }
        }
    }

    /// The node `name` (on worker connection `conn`) is gone: the bundles reserved on it are
    /// not reserved any more. A second loss in one input may follow a re-placement the
    /// simulator did not see: groups with an unreserved bundle are then unknown until seen
    /// placed again.
    fn node_lost(&mut self, conn: usize, name: &str) {
        if self.node_conns.get(name) == Some(&conn) {
            self.node_conns.remove(name);
        }
        self.node_epoch += 1;
        let again = self.closes_in_drain > 0;
        self.closes_in_drain += 1;
        for model in self.groups.values_mut() {
            if again && model.nodes.iter().any(Option::is_none) {
                model.known = false;
            }
            for node in &mut model.nodes {
                if node.as_deref() == Some(name) {
                    *node = None;
                    self.report.groups.bundles_lost += 1;
                }
            }
        }
    }

    /// The capacity of the connected node `name`, if it is one.
    fn node_capacity(&self, name: &str) -> Option<&Resources> {
        let &conn = self.node_conns.get(name)?;
        match self.conns[conn].peer {
            Peer::Worker(slot) if self.conns[conn].open => Some(&self.workers[slot].offer.capacity),
            _ => None,
        }
    }

    /// Whether the connected nodes could hold `model` as its strategy asks, its reserved
    /// bundles staying where they are, with `room(name, capacity)` on each node (its capacity,
    /// to ask what could ever fit). An error if a reserved bundle is on no connected node.
    fn group_fits(&self, model: &GroupModel, room: impl Fn(&str, &Resources) -> Resources) -> Step<bool> {
        let mut nodes: Vec<(&str, Resources)> = self
            .node_conns
            .keys()
            .filter_map(|name| Some((name.as_str(), room(name, self.node_capacity(name)?))))
            .collect();
        nodes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut kept = Vec::with_capacity(model.nodes.len());
        for node in &model.nodes {
            kept.push(match node {
                None => None,
                Some(name) => Some(nodes.iter().position(|(n, _)| n == name).ok_or_else(|| {
                    format!("the simulator has a bundle on {name}, which is no connected node")
                })?),
            });
        }
        let room: Vec<Resources> = nodes.into_iter().map(|(_, room)| room).collect();
        Ok(groups::feasible(model.strategy, &model.bundles, &kept, &room))
    }

    /// After each input: where the head holds each group now. A placed group keeps its
    /// strategy's promise on connected nodes with room for it, and no bundle moved while its
    /// node stayed; a pending one is said to be infeasible exactly when the connected nodes
    /// could never hold it.
    fn observe_groups(&mut self) -> Step {
        if self.groups.is_empty() {
            return Ok(());
        }
        let ids: Vec<GroupId> = self.groups.iter().filter(|(_, m)| !m.gone).map(|(id, _)| *id).collect();
        for id in ids {
            let status = self.head.scheduler().group_status(id);
            let Some(model) = self.groups.get(&id) else { continue };
            if status.is_some() && !self.head.sessions.contains_key(&model.owner) {
                return Err(format!("{id} is still held after its job {} ended", model.owner));
            }
            match status {
                None => {
                    if model.seen
                        && let Some(model) = self.groups.get_mut(&id)
                    {
                        model.gone = true;
                        model.placed = false;
                        model.nodes.fill(None);
                        self.report.groups.removed += 1;
                    }
                }
                Some(GroupStatus::Placed { nodes }) => {
                    groups::check_placed(model.strategy, &model.bundles, &nodes, |name| {
                        self.node_capacity(name)
                    })
                    .map_err(|e| format!("{id} ({}) is placed wrongly: {e}", model.strategy))?;
                    if model.known {
                        for (b, (was, now)) in model.nodes.iter().zip(&nodes).enumerate() {
                            if let Some(was) = was
                                && was != now
                            {
                                return Err(format!(
                                    "{id} bundle {b} moved from {was} to {now}, though {was} stayed connected"
                                ));
                            }
                        }
                    }
                    if !model.placed {
                        self.report.groups.placed += 1;
                    }
                    let Some(model) = self.groups.get_mut(&id) else { continue };
                    model.nodes = nodes.into_iter().map(Some).collect();
                    model.known = true;
                    model.seen = true;
                    model.placed = true;
                    model.checked = None;
                }
                Some(GroupStatus::Pending { infeasible }) => {
                    let key = (self.node_epoch, model.nodes.clone(), infeasible.is_some());
                    let check = model.known && model.checked.as_ref() != Some(&(key.0, key.1.clone()));
                    if check {
                        let fits = self.group_fits(model, |_, capacity| capacity.clone())?;
                        match (&infeasible, fits) {
                            (Some(reason), true) => {
                                return Err(format!(
                                    "{id} ({}, {}) is reported infeasible ({reason}), but the connected nodes can hold it: {}",
                                    model.strategy,
                                    self.describe_group(model),
                                    self.describe_nodes()
                                ));
                            }
                            (None, false) => {
                                return Err(format!(
                                    "{id} ({}, {}) can never be placed on the connected nodes, yet the head does not say so: {}",
                                    model.strategy,
                                    self.describe_group(model),
                                    self.describe_nodes()
                                ));
                            }
                            _ => {}
                        }
                    }
                    let Some(model) = self.groups.get_mut(&id) else { continue };
                    model.seen = true;
                    model.placed = false;
                    if check {
                        model.checked = Some((key.0, key.1));
                    }
                }
            }
        }
        Ok(())
    }

    /// A group's bundles and where they are, for failure messages.
    fn describe_group(&self, model: &GroupModel) -> String {
        let bundles: Vec<String> = model
            .bundles
            .iter()
            .zip(&model.nodes)
            .map(|(bundle, node)| format!("[{bundle}] on {}", node.as_deref().unwrap_or("none")))
            .collect();
        bundles.join(", ")
    }

    /// The connected nodes and their capacities, for failure messages.
    fn describe_nodes(&self) -> String {
        let mut nodes: Vec<String> = self
            .node_conns
            .keys()
            .filter_map(|name| Some(format!("{name} [{}]", self.node_capacity(name)?)))
            .collect();
        nodes.sort_unstable();
        nodes.join(", ")
    }

    /// What the tasks leased to worker connection `conn` request in `group`: in all, and those
    /// in `bundle`.
    fn group_use(&self, conn: usize, group: GroupId, bundle: Option<u32>) -> (Resources, Resources) {
        let (mut all, mut pinned) = (Resources::new(), Resources::new());
        for (&task, &leased) in &self.leases {
            if leased != conn {
                continue;
            }
            let Some(owner) = self.owner(task) else { continue };
            let Some((g, b)) = owner.task_bundle(task.seq()) else { continue };
            if g != group {
                continue;
            }
            let Some(facts) = owner.function_facts(task.seq(), &self.catalog) else { continue };
            groups::add(&mut all, &facts.request);
            if b.is_some() && b == bundle {
                groups::add(&mut pinned, &facts.request);
            }
        }
        (all, pinned)
    }

    /// The dispatches into bundles of the input just carried out: each runs on its bundle's
    /// node (any bundle's, if it named none), and the tasks running in a bundle (in a group, on
    /// one node) request no more than it reserves (they reserve there).
    fn check_group_dispatches(&mut self) -> Step {
        if self.group_dispatches.is_empty() {
            return Ok(());
        }
        for (task, group, bundle, conn) in std::mem::take(&mut self.group_dispatches) {
            if !self.conns[conn].open {
                continue;
            }
            self.report.groups.tasks += 1;
            let Some(name) = self.conns[conn].node_name.clone() else {
                return Err(format!("{task} was sent to connection {conn}, which has no node name"));
            };
            let Some(model) = self.groups.get(&group) else {
                return Err(format!("{task} runs in {group}, which no driver created"));
            };
            if model.gone {
                return Err(format!("{task} was sent to {name} to run in {group}, which was removed"));
            }
            if !model.known {
                continue;
            }
            let ok = match bundle {
                Some(b) => model.nodes.get(b as usize).is_some_and(|n| n.as_deref() == Some(name.as_str())),
                None => model.nodes.iter().any(|n| n.as_deref() == Some(name.as_str())),
            };
            if !ok {
                return Err(format!(
                    "{task} runs in {group}{} but was sent to {name}; the group holds {}",
                    bundle.map_or_else(String::new, |b| format!(" bundle {b}")),
                    self.describe_group(model)
                ));
            }
            let (all, pinned) = self.group_use(conn, group, bundle);
            let mut reserved = Resources::new();
            model.reserved_on(&name, &mut reserved);
            let bundle_holds = bundle.and_then(|b| model.bundles.get(b as usize));
            if !reserved.covers(&all) || bundle_holds.is_some_and(|held| !held.covers(&pinned)) {
                return Err(format!(
                    "with {task}, the tasks of {group} on {name} request {all} (those in its bundle {bundle:?}: {pinned}), more than it reserves there ({}): {}",
                    self.describe_group(model),
                    reserved
                ));
            }
        }
        Ok(())
    }

    /// The head answers `GroupReady` for `group`: placed on connected nodes as its strategy
    /// asks, or infeasible only if the connected nodes truly cannot hold it.
    fn check_ready_answer(&mut self, task: TaskId, group: GroupId, done: &Done, earlier: bool) -> Step {
        match done {
            Done::Value(bytes) => {
                self.report.groups.ready += 1;
                let Ok(nodes) = rmp_serde::from_slice::<Vec<String>>(bytes) else {
                    return Err(format!(
                        "{task}: the answer to GroupReady for {group} is not a list of nodes"
                    ));
                };
                let Some(model) = self.groups.get(&group) else { return Ok(()) };
                if !earlier {
                    groups::check_placed(model.strategy, &model.bundles, &nodes, |name| {
                        self.node_capacity(name)
                    })
                    .map_err(|e| format!("{task}: GroupReady for {group} ({}): {e}", model.strategy))?;
                }
            }
            Done::Failed(TaskError::PlacementGroup {
                problem: GroupProblem::Infeasible { reason }, ..
            }) => {
                self.report.groups.infeasible += 1;
                let Some(model) = self.groups.get(&group) else { return Ok(()) };
                if !earlier && model.known && self.group_fits(model, |_, capacity| capacity.clone())? {
                    return Err(format!(
                        "{task}: {group} ({}, {}) was reported infeasible ({reason}), but the connected nodes can hold it: {}",
                        model.strategy,
                        self.describe_group(model),
                        self.describe_nodes()
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// What the scheduler has free on the connected node `name`.
    fn node_free_by_name(&self, name: &str) -> Option<Resources> {
        let &conn = self.node_conns.get(name)?;
        let Peer::Worker(slot) = self.conns[conn].peer else { return None };
        let (node, now) = self.workers[slot].node()?;
        (now == name).then(|| self.head.scheduler().node_free(node)).flatten()
    }

    /// What the groups are known to reserve on the node `name`.
    fn reserved_on(&self, name: &str) -> Resources {
        let mut reserved = Resources::new();
        for model in self.groups.values().filter(|m| !m.gone) {
            model.reserved_on(name, &mut reserved);
        }
        reserved
    }

    fn write_done(&mut self, key: &(String, u64)) {
        if let Some(count) = self.pending_writes.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.pending_writes.remove(key);
            }
        }
    }

    /// The head sends a watching service a result to write: one a task did return, tagged,
    /// that the watchers' rules ask for.
    fn check_write(&mut self, conn: usize, task: TaskId, args: &[ArgValue]) -> Step {
        let decoded = match args {
            [tag, value] => rmp_serde::from_slice::<String>(&tag.0)
                .ok()
                .zip(rmp_serde::from_slice::<serde_bytes::ByteBuf>(&value.0).ok()),
            _ => None,
        };
        let Some((tag, value)) = decoded else {
            return Err(format!("the head sent write {task} with arguments that are not (tag, value)"));
        };
        let key = (tag, model::digest(&value));
        match self.tagged_results.get(&key) {
            None => {
                return Err(format!(
                    "the head sent write {task} of a {}-byte value tagged {:?} that no task returned",
                    value.len(),
                    key.0
                ));
            }
            Some(&function) if !model::watched(function, &key.0) => {
                return Err(format!(
                    "the head sent write {task} of a {} result tagged {:?}, which no watcher asked for",
                    model::FUNCTIONS[function].name,
                    key.0
                ));
            }
            Some(_) => {}
        }
        *self.pending_writes.entry(key.clone()).or_default() += 1;
        self.writes.insert(task, (key, conn));
        Ok(())
    }

    /// Carries out what the head decided; called after every input to the head.
    fn drain_outbox(&mut self) -> Step {
        self.deadline = None;
        self.closes_in_drain = 0;
        while let Some(action) = self.head.poll_action() {
            self.report.frames += 1;
            match action {
                Action::Send { to, ref frame } => {
                    self.report.digest = mix64(self.report.digest ^ mix64(to.0) ^ model::digest(frame));
                    let Some((_, message)) = action.decoded() else {
                        return Err(format!("the head sent {to} a frame that does not decode as HeadToPeer"));
                    };
                    let Some(&conn) = self.sessions.get(&to) else {
                        return Err(format!("the head sent {message:?} to {to}, a session it never opened"));
                    };
                    let earlier = self.decided_before.get_mut(&to).is_some_and(|left| {
                        *left -= 1;
                        true
                    });
                    if self.decided_before.get(&to) == Some(&0) {
                        self.decided_before.remove(&to);
                    }
                    if !self.conns[conn].open {
                        // The runtime finds no connection and drops it.
                        self.report.sends_after_close += 1;
                        continue;
                    }
                    let undo = if self.cfg.head_crashes { self.undo_for(&message) } else { Undo::Nothing };
                    self.note(false, || format!("the head sends conn {conn} ({to}): {message:?}"));
                    self.check_sent(conn, to, &message, earlier)?;
                    if self.must_hold() {
                        self.held.push_back(Held::Frame { conn, message: Box::new(message), undo });
                    } else if !self.conns[conn].cut {
                        self.send_to_peer(conn, Event::ToPeer { conn, message: Box::new(message) });
                    }
                }
                Action::CallOwnNode { session, .. } => {
                    return Err(format!(
                        "the head handed a call to its own node ({session}) in process, which the simulator never asks for"
                    ));
                }
                Action::Close { session, reason, code } => {
                    if code == chia_core::protocol::CloseCode::Replaced {
                        self.report.faults.replaced += 1;
                    }
                    self.report.digest =
                        mix64(self.report.digest ^ mix64(!session.0) ^ model::digest(reason.as_bytes()));
                    let Some(&conn) = self.sessions.get(&session) else {
                        return Err(format!("the head closed {session}, a session it never opened"));
                    };
                    if let Peer::Driver(index) = self.conns[conn].peer
                        && !self.conns[conn].cut
                    {
                        return Err(format!("the head closed driver {index}'s connection ({reason})"));
                    }
                    if self.conns[conn].open && !self.conns[conn].cut {
                        self.report.faults.written_off += 1;
                        if self.must_hold() {
                            let leases =
                                self.leases.iter().filter(|(_, c)| **c == conn).map(|(t, _)| *t).collect();
                            self.held.push_back(Held::Close { conn, session, leases });
                        } else {
                            self.ended.insert(session);
                            self.send_to_peer(conn, Event::ClosedByHead { conn });
                        }
                    } else {
                        self.ended.insert(session);
                    }
                    self.session_closed(conn);
                }
                Action::SaveServices(services) => {
                    self.report.digest = mix64(self.report.digest ^ services.len() as u64);
                }
                Action::Keep(entry) => {
                    // Kept only with head crashes (journal_id: Some): made durable by a later
                    // group commit, and what follows it waits for that.
                    if let JournalEntry::Message { session, seq, .. } = &entry {
                        self.through.insert(*session, *seq);
                    }
                    self.note(false, || format!("the head keeps {entry:?}"));
                    self.journal.push(entry);
                    if !self.commit_scheduled {
                        self.commit_scheduled = true;
                        let at = if self.net.chance(300) {
                            self.now
                        } else {
                            self.now + self.net.range(100, 5_000)
                        };
                        self.busy += 1;
                        self.queue.push(at, Event::Commit);
                    }
                }
            }
        }
        self.observe_groups()?;
        self.check_group_dispatches()
    }

    /// A frame must wait while anything before it is not durable (and frames keep their order).
    fn must_hold(&self) -> bool {
        self.durable < self.journal.len() || !self.held.is_empty()
    }

    /// What `check_sent` records of `message`, to forget if it never leaves.
    fn undo_for(&self, message: &HeadToPeer) -> Undo {
        match message {
            HeadToPeer::Execute { task, .. } => Undo::Execute {
                task: *task,
                attempt: self.attempts.get(task).copied(),
                lease: self.leases.get(task).copied(),
            },
            HeadToPeer::CallInstance { task, method, .. } if method == WATCH_METHOD => {
                Undo::Write { task: *task }
            }

            HeadToPeer::Done { .. } => Undo::Named(self.named.clone()),
            _ => Undo::Nothing,
        }
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Nothing => {}
            Undo::Execute { task, attempt, lease } => {
                match attempt {
                    Some(attempt) => self.attempts.insert(task, attempt),
                    None => self.attempts.remove(&task),
                };
                match lease {
                    Some(lease) => self.leases.insert(task, lease),
                    None => self.leases.remove(&task),
                };
            }
            Undo::Write { task } => {
                if let Some((key, _)) = self.writes.remove(&task) {
                    self.write_done(&key);
                }
            }
            Undo::Named(named) => self.named = named,
        }
    }

    /// A group commit: everything kept so far is durable; what waited for it leaves, and each
    /// session hears how far its messages are durable.
    fn commit(&mut self) -> Step {
        self.commit_scheduled = false;
        if self.head_down {
            return Ok(());
        }
        self.durable = self.journal.len();
        if self.net.chance(COMPACTIONS_PER_MILLE)
            && let Some(snapshot) = self.head.snapshot()
        {
            // Compaction: what is durable now starts again from the head's state.
            self.journal = vec![snapshot];
            self.durable = 1;
            self.report.compactions += 1;
        }
        while let Some(held) = self.held.pop_front() {
            match held {
                Held::Frame { conn, message, .. } => {
                    if !self.conns[conn].cut {
                        self.send_to_peer(conn, Event::ToPeer { conn, message });
                    }
                }
                Held::Close { conn, session, .. } => {
                    self.ended.insert(session);
                    if !self.conns[conn].cut {
                        self.send_to_peer(conn, Event::ClosedByHead { conn });
                    }
                }
            }
        }
        for (session, through) in std::mem::take(&mut self.through) {
            let Some(&conn) = self.sessions.get(&session) else { continue };
            if self.conns[conn].open && !self.conns[conn].cut && !self.conns[conn].resuming {
                let message = Box::new(HeadToPeer::Durable { through });
                self.send_to_peer(conn, Event::ToPeer { conn, message });
            }
        }
        Ok(())
    }

    /// The head process dies: what was not durable is lost, with every connection and every
    /// frame in flight; the peers notice and come back once it is up again.
    fn crash_head(&mut self) {
        self.note(true, || "the head crashed".to_string());
        self.report.faults.head_crashes += 1;
        self.head_down = true;
        self.deadline = None;
        self.journal.truncate(self.durable);
        self.through.clear();
        self.decided_before.clear();
        while let Some(held) = self.held.pop_back() {
            match held {
                Held::Frame { undo, .. } => self.undo(undo),
                // The restarted head never decided the close: the session still runs these
                // (whether it is open is decided again when the head is up).
                Held::Close { conn, leases, .. } => {
                    for task in leases {
                        self.leases.insert(task, conn);
                    }
                }
            }
        }
        // Writes that never reached their host: the restarted head fails them (or has never
        // decided them).
        let lost: Vec<TaskId> =
            self.writes.keys().filter(|t| !self.writes_delivered.contains(t)).copied().collect();
        for write in lost {
            if let Some((key, _)) = self.writes.remove(&write) {
                self.write_done(&key);
            }
        }
        for conn in &mut self.conns {
            conn.cut = true;
        }
        for slot in 0..self.workers.len() {
            if let Some(conn) = self.workers[slot].conn() {
                let at = self.now + self.net.range(1_000, 30_000);
                self.queue.push(at, Event::Reconnect { peer: Peer::Worker(slot), conn });
            }
        }
        for index in 0..self.drivers.len() {
            // One not started yet says its hello when it starts.
            if !self.drivers[index].dead && self.drivers[index].started {
                let conn = self.drivers[index].conn;
                let at = self.now + self.net.range(1_000, 30_000);
                self.queue.push(at, Event::Reconnect { peer: Peer::Driver(index), conn });
            }
        }
        let downtime = self.faults_rng.range(20_000, 800_000);
        self.queue.push(self.now + downtime, Event::HeadRestart);
    }

    /// The head starts again from the durable journal; the sessions it holds are what is open.
    fn restart_head(&mut self) -> Step {
        let now = self.instant(self.now);
        let (core, _) = HeadCore::recover(now, self.options.clone(), self.journal.clone())
            .map_err(|e| format!("the head could not recover from its journal: {e}"))?;
        self.head = core;
        self.head_down = false;
        self.deadline = None;
        let live: HashSet<SessionId> = self.head.sessions.keys().copied().collect();
        self.offered.clear();
        self.task_nodes = 0;
        self.open_workers = 0;
        self.open_sessions = 0;
        for index in 0..self.conns.len() {
            let c = &self.conns[index];
            let open = c.session.is_some_and(|s| live.contains(&s) && self.sessions.get(&s) == Some(&index));
            self.conns[index].open = open;
            if open {
                self.open_sessions += 1;
                if let Peer::Worker(slot) = self.conns[index].peer {
                    self.node_opened(slot, 1);
                }
            }
        }
        self.leases.retain(|_, conn| self.conns[*conn].open);
        self.node_conns.retain(|_, conn| self.conns[*conn].open);
        self.node_epoch += 1;
        // What was seen of the groups may have been decided after what the journal kept: they
        // are looked at afresh.
        for model in self.groups.values_mut() {
            model.nodes.fill(None);
            model.known = false;
            model.seen = false;
            model.gone = false;
            model.placed = false;
            model.checked = None;
        }
        self.drain_outbox()
    }

    /// `peer` learned that `conn` to the head is gone: it takes up its session on a new
    /// connection (or joins afresh if it has none to take up), once the head answers.
    fn reconnect(&mut self, peer: Peer, conn: usize) -> Step {
        let retry = |world: &mut World| {
            let later = world.net.range(20_000, 100_000);
            world.queue.push(world.now + later, Event::Reconnect { peer, conn });
        };
        match peer {
            Peer::Worker(slot) => {
                if self.frozen[slot].is_some() {
                    self.defer(slot, Event::Reconnect { peer, conn });
                    return Ok(());
                }
                if self.workers[slot].conn() != Some(conn) {
                    return Ok(());
                }
                if self.head_down {
                    self.workers[slot].track.lost();
                    retry(self);
                    return Ok(());
                }
                let fresh = self.new_conn(peer);
                match self.workers[slot].resume(fresh) {
                    Some(resume) => {
                        self.migrate(conn, fresh);
                        self.send_to_head(fresh, resume);
                    }
                    None => {
                        if let Some(session) = self.workers[slot].session() {
                            self.ended.insert(session);
                        }
                        self.worker_lost_head(slot);
                    }
                }
            }
            Peer::Driver(index) => {
                if self.drivers[index].dead || self.drivers[index].exited || self.drivers[index].conn != conn
                {
                    return Ok(());
                }
                if self.head_down {
                    self.drivers[index].track.lost();
                    retry(self);
                    return Ok(());
                }
                let fresh = self.new_conn(peer);
                self.drivers[index].conn = fresh;
                match self.drivers[index].resume() {
                    Some(resume) => {
                        self.migrate(conn, fresh);
                        self.send_to_head(fresh, resume);
                    }
                    None => {
                        let hello = self.drivers[index].hello();
                        self.send_to_head(fresh, hello);
                    }
                }
            }
        }
        Ok(())
    }

    /// A session moves to a new connection, on which its peer sends `Resume`.
    fn migrate(&mut self, old: usize, fresh: usize) {
        let (session, open) = (self.conns[old].session, self.conns[old].open);
        self.conns[old].open = false;
        let name = self.conns[old].node_name.clone();
        if let Some(name) = &name
            && self.node_conns.get(name) == Some(&old)
        {
            self.node_conns.insert(name.clone(), fresh);
        }
        let c = &mut self.conns[fresh];
        c.session = session;
        c.open = open;
        c.resuming = true;
        c.node_name = name;
        if let Some(session) = session {
            self.sessions.insert(session, fresh);
        }
        for leased in self.leases.values_mut() {
            if *leased == old {
                *leased = fresh;
            }
        }
        for (_, to) in self.writes.values_mut() {
            if *to == old {
                *to = fresh;
            }
        }
    }

    fn owner(&self, task: TaskId) -> Option<&SimDriver> {
        let conn = *self.sessions.get(&task.session())?;
        match self.conns[conn].peer {
            Peer::Driver(index) => self.drivers.get(index),
            Peer::Worker(_) => None,
        }
    }

    /// Checks a message as the head sends it, against what the whole cluster knows.
    /// `earlier`: decided before now (held for a session taken up again).
    fn check_sent(&mut self, conn: usize, to: SessionId, message: &HeadToPeer, earlier: bool) -> Step {
        let to_worker = matches!(self.conns[conn].peer, Peer::Worker(_));
        match message {
            HeadToPeer::Execute { task, attempt, job, .. } => {
                let Some(owner) = self.owner(*task) else {
                    return Err(format!("the head sent {task} to run, but no driver submitted it"));
                };
                if !to_worker {
                    return Err(format!("the head sent {task} to run on {to}, which is not a worker"));
                }
                if let Some(&leased) = self.leases.get(task)
                    && leased != conn
                    && self.conns[leased].open
                {
                    return Err(format!(
                        "attempt {attempt} of {task} was sent to {to} while it still runs on {:?}",
                        self.conns[leased].session
                    ));
                }
                let previous = self.attempts.get(task).copied().unwrap_or(0);
                // After a head restart, a run lost on its way is sent again to the same session
                // (the worker checks it did not get it already).
                let again = *attempt == previous
                    && self.report.faults.head_crashes > 0
                    && self.leases.get(task) == Some(&conn);
                if *attempt <= previous && !again {
                    return Err(format!("{task} was sent as attempt {attempt} after attempt {previous}"));
                }
                // Dispatches lost before their worker acknowledged them are free, up to a limit.
                if let Some(max) = owner.max_attempts(task.seq())
                    && *attempt > max + u32::from(crate::scheduler::UNACKNOWLEDGED_LOSSES)
                {
                    return Err(format!(
                        "{task} was sent as attempt {attempt}, but it may run {max} time(s) at most"
                    ));
                }
                check_job_settings(*task, job.as_ref(), owner.job_revisions(task.seq()))?;
                let in_bundle = owner.task_bundle(task.seq());
                if let (Some(asked), Peer::Worker(slot)) =
                    (owner.asked_labels(task.seq()), self.conns[conn].peer)
                {
                    let asked = chia_core::placement::Labels::parse(asked).unwrap_or_default();
                    let offered = &self.workers[slot].offer.labels;
                    if !offered.satisfy(&asked) {
                        return Err(format!(
                            "{task} asks for labels {asked} but was sent to {to}, which has {offered}"
                        ));
                    }
                }
                self.attempts.insert(*task, *attempt);
                self.leases.insert(*task, conn);
                self.report.dispatches += 1;
                if let Some((group, bundle)) = in_bundle {
                    self.group_dispatches.push((*task, group, bundle, conn));
                }
            }
            HeadToPeer::StartInstance { task, service, .. } => {
                if !to_worker {
                    return Err(format!("the head asked {to}, which is not a worker, to host {service}"));
                }
                // A driver's start names its request (again, if the head crashed and gave its
                // id to another start); a restart by the head reuses what was placed first.
                if !self.services.contains_key(service) || task.session() != HEAD_SESSION {
                    let request = match self.owner(*task) {
                        Some(owner) => owner.start_request(task.seq(), &self.catalog).cloned(),
                        None => None,
                    };
                    let Some(request) = request else {
                        return Err(format!(
                            "the head placed {service} for {task}, which is no service start{}",
                            if task.session() == HEAD_SESSION {
                                " (a restart of a service never placed)"
                            } else {
                                ""
                            }
                        ));
                    };
                    self.services.insert(*service, ServiceMeta { request });
                }
                self.report.dispatches += 1;
            }
            HeadToPeer::Done { task, done } => {
                if task.session() != to {
                    return Err(format!(
                        "the head told {to} how {task} ended, but {task} is not its task: {done:?}"
                    ));
                }
                self.check_done(*task, done, earlier)?;
                self.last_progress = self.now;
            }
            HeadToPeer::Welcome { node: Some(_), node_name, .. } if to_worker => {
                self.conns[conn].node_name = Some(node_name.clone());
                self.node_conns.insert(node_name.clone(), conn);
                self.node_epoch += 1;
            }
            HeadToPeer::Fetched { task, .. } | HeadToPeer::Infeasible { task, .. }
                if task.session() != to =>
            {
                return Err(format!("the head sent {to} news of {task}, which is not its task: {message:?}"));
            }
            HeadToPeer::CallInstance { task, method, args, .. } if to_worker && method == WATCH_METHOD => {
                self.check_write(conn, *task, args)?;
            }
            HeadToPeer::CallInstance { .. } | HeadToPeer::StopInstance { .. } | HeadToPeer::Cancel { .. }
                if !to_worker =>
            {
                return Err(format!("the head sent a worker's message to driver session {to}: {message:?}"));
            }
            // The handshake, pongs and journal notices: nothing the cluster can check.
            _ => {}
        }
        Ok(())
    }

    fn check_done(&mut self, task: TaskId, done: &Done, earlier: bool) -> Step {
        if let Done::Value(_) | Done::Stored { .. } = done
            && let Some((tag, digest)) = self.owner(task).and_then(|d| d.watched_result(task.seq()))
            && self.pending_writes.contains_key(&(tag.to_string(), digest))
        {
            return Err(format!("{task} (tagged {tag:?}) was announced before its write to a watcher ended"));
        }
        if let Some(group) = self.owner(task).and_then(|d| d.ready_of(task.seq())) {
            return self.check_ready_answer(task, group, done, earlier);
        }
        let again = !self.announced.insert(task);
        match done {
            Done::Failed(TaskError::UnknownFunction { .. } | TaskError::SignatureMismatch { .. })
                if again => {}
            Done::Failed(TaskError::UnknownFunction { function }) => {
                let offering: usize = self.offered.get(function).map_or(0, |sigs| sigs.values().sum());
                if offering > 0 || self.task_nodes == 0 {
                    return Err(format!(
                        "{task} failed with UnknownFunction({function}) while {offering} open node(s) offer it and {} run tasks",
                        self.task_nodes
                    ));
                }
            }
            Done::Failed(TaskError::SignatureMismatch { function, expected, found }) => {
                let sigs = self.offered.get(function);
                let offered: Vec<String> =
                    sigs.into_iter().flatten().filter(|&(_, &n)| n > 0).map(|(sig, _)| sig.clone()).collect();
                if offered.contains(expected) || &offered != found {
                    return Err(format!(
                        "{task} failed with SignatureMismatch({function}: {expected}, found {found:?}) while open nodes offer {offered:?}"
                    ));
                }
            }
            Done::Value(bytes) if self.owner(task).is_some_and(|d| d.is_service_request(task.seq())) => {
                let info = match rmp_serde::from_slice::<ServiceInfo>(bytes) {
                    Ok(info) => Some(info),
                    Err(_) => rmp_serde::from_slice::<Option<ServiceInfo>>(bytes).ok().flatten(),
                };
                if let Some(info) = info {
                    self.check_service_named(task, &info, earlier)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The head named `info` as the service under its name: its host serves it, no other open
    /// node serves another instance under that name, and the head never goes back to an older
    /// instance of a name. Named `earlier` (held for a session taken up again), only the last
    /// holds: the instance may have stopped since.
    fn check_service_named(&mut self, task: TaskId, info: &ServiceInfo, earlier: bool) -> Step {
        let name = format!("{}/{}", info.namespace, info.name);
        let open = |w: &SimWorker| w.conn().is_some_and(|c| self.conns[c].open);
        let host = self.workers.iter().find(|w| open(w) && w.node().is_some_and(|(_, n)| n == info.node));
        match host {
            _ if earlier => {}
            Some(host) if host.serves(info.id) => {}
            Some(host) => {
                return Err(format!(
                    "{task} was answered with {name} = {} on {}, which does not serve it: {}",
                    info.id,
                    info.node,
                    host.summary()
                ));
            }
            // A node of the previous run waiting to be taken up after a head restart: the head
            // cannot know yet whether its worker lives (nor can it reach it).
            None if self
                .head
                .sessions
                .values()
                .any(|s| s.name == info.node && s.detached_until.is_some()) => {}
            None => {
                return Err(format!(
                    "{task} was answered with {name} = {} on {}, which is no open node",
                    info.id, info.node
                ));
            }
        }
        if self.cfg.strict_service_names && !earlier {
            for worker in self.workers.iter().filter(|w| open(w)) {
                if let Some((other, _)) = worker.serving().find(|&(id, n)| n == name && id != info.id) {
                    return Err(format!(
                        "{task} was answered with {name} = {}, while {other} of the same name still serves on an open node: {}",
                        info.id,
                        worker.summary()
                    ));
                }
            }
        }
        let newest = self.named.entry(name.clone()).or_insert(info.id);
        if info.id < *newest {
            return Err(format!(
                "{task} was answered with {name} = {}, after {} had been named",
                info.id, *newest
            ));
        }
        *newest = info.id;
        Ok(())
    }

    fn deliver_to_peer(&mut self, conn: usize, message: HeadToPeer) -> Step {
        if self.conns[conn].cut {
            return Ok(());
        }
        match self.conns[conn].peer {
            Peer::Worker(slot) => {
                if self.frozen[slot].is_some() {
                    self.defer(slot, Event::ToPeer { conn, message: Box::new(message) });
                    return Ok(());
                }
                if self.workers[slot].conn() != Some(conn) {
                    return Ok(()); // For an earlier life of the process.
                }
                let mut fx = std::mem::take(&mut self.fx_worker);
                let result = self.worker_message(slot, &mut fx, message);
                self.apply_worker(slot, fx);
                result
            }
            Peer::Driver(index) => {
                if self.drivers[index].dead {
                    return Ok(());
                }
                let mut fx = std::mem::take(&mut self.fx_driver);
                let driver = &mut self.drivers[index];
                let result = match message {
                    HeadToPeer::Welcome { session, resumed_through, .. } if driver.track.resuming => {
                        if driver.session != Some(session) {
                            return Err(format!(
                                "driver {index} took up {:?} again but was welcomed as {session}",
                                driver.session
                            ));
                        }
                        let again = driver.track.resumed(resumed_through);
                        self.note(false, || {
                            format!("driver {index} resumed through {resumed_through}, sends again {again:?}")
                        });
                        let resent: HashSet<TaskId> =
                            again.iter().filter_map(PeerToHead::repeatable_request).collect();
                        for message in again {
                            self.send_to_head(conn, message);
                        }
                        // Unanswered lookups and stops are asked again.
                        let now = self.now;
                        fx.sends.extend(self.drivers[index].unanswered(now, &resent));
                        Ok(())
                    }
                    HeadToPeer::Welcome { session, node, journal_id, .. } => {
                        let welcomed = driver.welcome(session, node, journal_id);
                        fx.timers.push((0, DriverTimer::Tick));
                        welcomed
                    }
                    HeadToPeer::Rejected { reason } if driver.track.resuming => Err(format!(
                        "the restarted head refused to let driver {index} take up its session: {reason}"
                    )),
                    HeadToPeer::Durable { through } => {
                        driver.track.durable(through);
                        Ok(())
                    }
                    HeadToPeer::Done { task, done } => driver.done(&mut fx, task, done),
                    HeadToPeer::Fetched { task, outcome } => driver.fetched(task, outcome),
                    HeadToPeer::Infeasible { task, .. } => {
                        driver.infeasible(self.now, task);
                        Ok(())
                    }
                    other @ (HeadToPeer::Execute { .. }
                    | HeadToPeer::StartInstance { .. }
                    | HeadToPeer::CallInstance { .. }
                    | HeadToPeer::StopInstance { .. }
                    | HeadToPeer::Cancel { .. }
                    | HeadToPeer::Rejected { .. }) => Err(format!("driver {index} was sent {other:?}")),
                    // Pongs and journal notices ask nothing of a driver.
                    _ => Ok(()),
                };
                self.apply_driver(index, fx);
                result
            }
        }
    }

    fn worker_message(&mut self, slot: usize, fx: &mut Effects<WorkerTimer>, message: HeadToPeer) -> Step {
        let lease = match &message {
            HeadToPeer::Execute { task, attempt, .. } => Some(TaskAttempt { task: *task, attempt: *attempt }),
            HeadToPeer::StartInstance { task, .. } | HeadToPeer::CallInstance { task, .. } => {
                Some(TaskAttempt { task: *task, attempt: 0 })
            }
            _ => None,
        };
        if let Some(lease) = lease {
            self.workers[slot].track.leased(lease);
        }
        match message {
            HeadToPeer::Welcome { session, resumed_through, .. } if self.workers[slot].track.resuming => {
                if self.workers[slot].session() != Some(session) {
                    return Err(format!(
                        "worker {slot} took up {:?} again but was welcomed as {session}",
                        self.workers[slot].session()
                    ));
                }
                let again = self.workers[slot].track.resumed(resumed_through);
                if let Some(conn) = self.workers[slot].conn() {
                    for message in again {
                        self.send_to_head(conn, message);
                    }
                }
                Ok(())
            }
            HeadToPeer::Rejected { .. } if self.workers[slot].track.resuming => {
                // Its session is gone: it starts over as a new node.
                if let Some(session) = self.workers[slot].session() {
                    self.ended.insert(session);
                }
                self.worker_lost_head(slot);
                Ok(())
            }
            HeadToPeer::Durable { through } => {
                self.workers[slot].track.durable(through);
                Ok(())
            }
            HeadToPeer::Welcome { session, node, node_name, heartbeat_ms, journal_id, .. } => {
                self.workers[slot].welcome(fx, session, node, node_name, heartbeat_ms, journal_id)
            }
            HeadToPeer::Execute { task, attempt, function, args, .. } => {
                // A frame that reaches a worker the head wrote off meanwhile (it was frozen) is
                // a stale run: its outcome will not count.
                if let Some(session) = self.workers[slot].session().filter(|s| !self.ended.contains(s)) {
                    if let Some(previous) = self.runs.get(&task)
                        && !previous.failed
                        && !self.ended.contains(&previous.session)
                    {
                        return Err(format!(
                            "worker {slot} ({session}) was given attempt {attempt} of {task}, which already ran as attempt {} on {}, a session that did not end, without an application error",
                            previous.attempt, previous.session
                        ));
                    }
                    self.runs.insert(task, RunRecord { session, attempt, failed: false });
                }
                let facts = self.owner(task).and_then(|d| d.function_facts(task.seq(), &self.catalog));
                let Some(facts) = facts else {
                    return Err(format!(
                        "worker {slot} was sent {task}, which is no function task of a driver"
                    ));
                };
                self.workers[slot].execute(fx, task, attempt, &function, args, &facts)
            }
            HeadToPeer::StartInstance { task, service, type_name, args } => {
                let Some(meta) = self.services.get(&service) else {
                    return Err(format!("worker {slot} was asked to host {service}, which no start placed"));
                };
                let request = meta.request.clone();
                let placement = Placement { task, service, type_name: &type_name, args, request: &request };
                self.workers[slot].start_instance(fx, &self.catalog, placement)
            }
            HeadToPeer::CallInstance { task, service, method, args } => {
                if method == WATCH_METHOD {
                    self.writes_delivered.insert(task);
                }
                self.workers[slot].call_instance(fx, task, service, &method, args)
            }
            HeadToPeer::StopInstance { service } => {
                self.workers[slot].stop_instance(fx, service);
                Ok(())
            }
            HeadToPeer::Cancel { task, force } => {
                self.workers[slot].cancel(fx, task, force);
                Ok(())
            }
            other @ (HeadToPeer::Done { .. }
            | HeadToPeer::Fetched { .. }
            | HeadToPeer::Infeasible { .. }
            | HeadToPeer::Rejected { .. }) => Err(format!("worker {slot} was sent {other:?}")),
            // Pongs and journal notices ask nothing of a worker.
            _ => Ok(()),
        }
    }

    /// The worker learned the head closed its connection: it starts over, as a new node.
    fn worker_lost_head(&mut self, slot: usize) {
        self.workers[slot].reset();
        let backoff = self.net.range(100_000, 400_000);
        let life = self.workers[slot].life;
        self.queue.push(self.now + backoff, Event::Worker { slot, life, timer: WorkerTimer::Restart });
    }

    fn inject_fault(&mut self) -> Step {
        let head_crashes = if self.cfg.head_crashes && !self.head_down { 15 } else { 0 };
        let kind = self.faults_rng.weighted(&[30, 20, 25, 10, head_crashes]);
        let now = self.instant(self.now);
        match kind {
            4 => self.crash_head(),
            0..=2 => {
                let slot = self.faults_rng.below(self.workers.len() as u64) as usize;
                let Some(conn) = self.workers[slot].conn() else { return Ok(()) };
                if kind == 0 {
                    // The process dies: its connection with it.
                    self.report.faults.worker_crashes += 1;
                    self.frozen[slot] = None;
                    self.conns[conn].cut = true;
                    if let Some(session) = self.workers[slot].session() {
                        self.ended.insert(session);
                    }
                    if let Some(session) = self.conns[conn].session.filter(|_| self.conns[conn].open)
                        && !self.head_down
                        && !self.conns[conn].resuming
                    {
                        self.head.close_session(now, session, "connection lost");
                        self.drain_outbox()?;
                        if self.head.sessions.contains_key(&session) {
                            // Taken up again a moment ago and not heard from since: it waits
                            // for its peer for the rest of the grace period.
                        } else {
                            self.session_closed(conn);
                        }
                    }
                    self.workers[slot].reset();
                    let life = self.workers[slot].life;
                    let back = self.faults_rng.range(50_000, 1_000_000);
                    self.queue
                        .push(self.now + back, Event::Worker { slot, life, timer: WorkerTimer::Restart });
                } else if self.frozen[slot].is_none() && self.workers[slot].session().is_some() {
                    // Frozen (SIGSTOP, a stalled machine): silent for a while, shorter or longer
                    // than the heartbeat timeout.
                    self.report.faults.freezes += 1;
                    let timeout = self.cfg.heartbeat_timeout.as_micros() as Micros;
                    let length = if kind == 1 {
                        self.faults_rng.range(timeout / 10, timeout * 7 / 10)
                    } else {
                        self.faults_rng.range(timeout * 12 / 10, timeout * 3)
                    };
                    self.freezes += 1;
                    self.frozen[slot] = Some((self.freezes, VecDeque::new()));
                    let freeze = self.freezes;
                    self.queue.push(self.now + length, Event::Thaw { slot, freeze });
                }
            }
            _ if self.draining => {}
            _ => {
                let alive: Vec<usize> = self
                    .drivers
                    .iter()
                    .filter(|d| !d.dead && !d.finished && d.session.is_some())
                    .map(|d| d.index)
                    .collect();
                if alive.is_empty() {
                    return Ok(());
                }
                let index = alive[self.faults_rng.below(alive.len() as u64) as usize];
                self.report.faults.driver_crashes += 1;
                let driver = &mut self.drivers[index];
                driver.dead = true;
                self.unfinished_drivers -= 1;
                let conn = driver.conn;
                self.conns[conn].cut = true;
                if let Some(session) = self.conns[conn].session.filter(|_| self.conns[conn].open)
                    && !self.head_down
                    && !self.conns[conn].resuming
                {
                    self.head.close_session(now, session, "driver gone");
                    self.drain_outbox()?;
                    if !self.head.sessions.contains_key(&session) {
                        self.session_closed(conn);
                    }
                }
                // Another run of the program takes over what was left to submit.
                let later = self.faults_rng.range(10_000, 500_000);
                self.spawn_driver(self.now + later);
            }
        }
        Ok(())
    }

    /// Every worker is joined, awake and runs nothing.
    fn workers_settled(&self) -> bool {
        self.workers.iter().zip(&self.frozen).all(|(w, frozen)| {
            frozen.is_none()
                && w.is_idle()
                && w.conn().is_some_and(|c| self.conns[c].open)
                && w.session().is_some()
        })
    }

    fn check_step(&mut self) -> Step {
        if self.head_down {
            return Ok(());
        }
        #[cfg(test)]
        if crate::planted::sabotaged(crate::planted::Sabotage::HeadForgetsATask)
            && self.step.is_multiple_of(200)
        {
            let awaited = self.head.held_tasks().into_iter().find(|&task| {
                self.owner(task).is_some_and(|d| !d.dead && d.waiting_for(usize::MAX).contains(&task))
            });
            if let Some(task) = awaited {
                self.head.forget_record(task);
                crate::planted::sabotage(None);
            }
        }
        let queued = self.head.scheduler().queued_len();
        self.report.largest_queue = self.report.largest_queue.max(queued);
        if !self.cfg.check_every_step && self.step < self.next_sweep {
            return Ok(());
        }
        // A sweep costs about as much as the head holds (a node's free resources cost as much
        // to read as a few dozen task records): spaced out so that, unless every step is
        // checked, sweeping takes a fraction of the time of the steps between two sweeps.
        let cost = self.head.task_count() + 32 * self.workers.len();
        self.next_sweep = self.step + cost as u64 / 8 + 1;
        self.head.check_consistency()?;
        if self.head.session_count() != self.open_sessions {
            return Err(format!(
                "the head holds {} sessions, the network {} open ones",
                self.head.session_count(),
                self.open_sessions
            ));
        }
        if self.head.node_count() != self.open_workers {
            return Err(format!(
                "the head holds {} nodes, the network {} open worker sessions",
                self.head.node_count(),
                self.open_workers
            ));
        }
        for worker in &self.workers {
            let Some((node, name)) = worker.node() else { continue };
            if !worker.conn().is_some_and(|c| self.conns[c].open) {
                continue;
            }
            let capacity = with_affinity(&worker.offer.capacity, name);
            // What placement groups reserve here is not free for other tasks.
            let reserved = self.reserved_on(name);
            let Some(room) = groups::minus(&capacity, &reserved) else {
                return Err(format!(
                    "placement groups reserve {reserved} on {name} ({node}), more than its capacity {capacity}"
                ));
            };
            match self.head.scheduler().node_free(node) {
                Some(free) if room.covers(&free) => {}
                Some(free) => {
                    return Err(format!(
                        "{name} ({node}) has {free} free, more than its capacity {capacity} less the {reserved} placement groups reserve there"
                    ));
                }
                None => return Err(format!("{name} ({node}) is open but unknown to the scheduler")),
            }
        }
        Ok(())
    }

    /// The cluster is idle: every driver got what it wanted and let go of it, nothing runs.
    fn idle_checks(&mut self) -> Step {
        self.head.check_consistency()?;
        for driver in self.drivers.iter().filter(|d| !d.dead) {
            driver.final_check()?;
        }
        // The groups left to their job's end still hold what they reserve: exactly that, where
        // the simulator knows where every group is.
        let exact = self.groups.values().all(|m| m.gone || m.known);
        for worker in &self.workers {
            let Some((node, name)) = worker.node() else { continue };
            let capacity = with_affinity(&worker.offer.capacity, name);
            let reserved = self.reserved_on(name);
            let expected = groups::minus(&capacity, &reserved).unwrap_or_default();
            let free = self.head.scheduler().node_free(node);
            let right = free.as_ref().is_some_and(|free| {
                if exact { groups::same(free, &expected) } else { expected.covers(free) }
            });
            if !right {
                return Err(format!(
                    "the cluster is idle, but {name} ({node}) has {} free of {capacity}, placement groups reserving {reserved} there; the head holds {} task(s): {}",
                    free.map_or("nothing".into(), |f| f.to_string()),
                    self.head.task_count(),
                    self.held_summary()
                ));
            }
        }
        // Nothing runs: a pending group the free room can hold now was left behind.
        for (id, model) in &self.groups {
            if model.gone || model.placed || !model.known || !model.seen {
                continue;
            }
            // What is free on each node, and what this group keeps there.
            let free = |name: &str, _: &Resources| {
                let mut room = self.node_free_by_name(name).unwrap_or_default();
                model.reserved_on(name, &mut room);
                room
            };
            if self.group_fits(model, free)? {
                return Err(format!(
                    "the cluster is idle, yet {id} ({}, {}) is pending although the free room can hold it: {}",
                    model.strategy,
                    self.describe_group(model),
                    self.describe_nodes()
                ));
            }
        }
        if self.head.task_count() != 0 {
            return Err(format!(
                "the cluster is idle and every driver released everything, yet the head holds {} task record(s): {}",
                self.head.task_count(),
                self.held_summary()
            ));
        }
        if self.head.scheduler().queued_len() != 0 {
            return Err(format!(
                "the cluster is idle, yet {} task(s) are queued",
                self.head.scheduler().queued_len()
            ));
        }
        // The drivers leave; nothing of theirs may stay behind.
        let now = self.instant(self.now);
        for index in 0..self.drivers.len() {
            let conn = self.drivers[index].conn;
            if let Some(session) = self.conns[conn].session.filter(|_| self.conns[conn].open) {
                self.conns[conn].cut = true;
                self.head.close_session(now, session, "the program ended");
                self.drain_outbox()?;
                self.session_closed(conn);
            }
        }
        if self.head.task_count() != 0 || self.head.session_count() != self.open_workers {
            return Err(format!(
                "after every driver left, the head holds {} task(s) and {} session(s) ({} workers): {}",
                self.head.task_count(),
                self.head.session_count(),
                self.open_workers,
                self.held_summary()
            ));
        }
        // Their groups went with their jobs, and what they reserved with them.
        if self.head.scheduler().group_count() != 0 {
            let held: Vec<String> =
                self.groups.iter().filter(|(_, m)| !m.gone && m.seen).map(|(id, _)| id.to_string()).collect();
            return Err(format!(
                "after every driver left, the head holds {} placement group(s): {held:?}",
                self.head.scheduler().group_count()
            ));
        }
        for worker in &self.workers {
            let Some((node, name)) = worker.node() else { continue };
            let capacity = with_affinity(&worker.offer.capacity, name);
            let free = self.head.scheduler().node_free(node);
            if !free.as_ref().is_some_and(|free| groups::same(free, &capacity)) {
                return Err(format!(
                    "after every driver left, {name} ({node}) has {} free of {capacity}",
                    free.map_or("nothing".into(), |f| f.to_string())
                ));
            }
        }
        self.head.check_consistency()
    }

    fn held_summary(&self) -> String {
        let held = self.head.held_tasks();
        let shown: Vec<String> = held.iter().take(8).filter_map(|&t| self.head.describe_task(t)).collect();
        format!("{}{}", shown.join("; "), if held.len() > 8 { "; ..." } else { "" })
    }

    /// Why the run did not drain in time, with what is still waiting.
    fn not_draining(&self) -> String {
        let mut waiting = Vec::new();
        for driver in self.drivers.iter().filter(|d| !d.dead && !d.finished) {
            for task in driver.waiting_for(4) {
                let head = self.head.describe_task(task).unwrap_or_else(|| "unknown to the head".into());
                let scheduler = self.head.scheduler().task_status(task);
                waiting.push(format!("{task} (driver {}): {head}; scheduler: {scheduler:?}", driver.index));
            }
        }
        let workers: Vec<String> = self
            .workers
            .iter()
            .filter(|w| !w.is_idle() || w.session().is_none())
            .take(4)
            .map(|w| w.summary())
            .collect();
        format!(
            "the run did not drain after {} steps ({} tasks left to submit, {} driver(s) unfinished, {} message(s) in flight, {} event(s) queued); waiting: [{}]; workers: [{}]",
            self.step,
            self.budget,
            self.unfinished_drivers,
            self.busy,
            self.queue.len(),
            waiting.join(" | "),
            workers.join(" | ")
        )
    }
}

/// The settings `task` is sent with: its job's (its owner's, as no task here is nested), of a
/// revision between the one its owner had sent when it submitted and the newest it sent.
fn check_job_settings(task: TaskId, job: Option<&JobSettings>, revisions: Option<(u64, u64)>) -> Step {
    let Some((at_submit, newest)) = revisions else { return Ok(()) };
    match job {
        None if at_submit == 0 => Ok(()),
        None => Err(format!(
            "{task} was sent without its job's settings (revision {at_submit} was set before it)"
        )),
        Some(job) if job.job != task.session() => {
            Err(format!("{task} was sent with the settings of {}'s job, not its owner's", job.job))
        }
        Some(job) if job.revision < at_submit.max(1) || job.revision > newest => Err(format!(
            "{task} was sent with revision {} of its job's settings; it was submitted at {at_submit}, the newest is {newest}",
            job.revision
        )),
        Some(job) if job.settings != model::job_settings(job.revision) => Err(format!(
            "{task} was sent with revision {} of its job's settings, but other bytes",
            job.revision
        )),
        Some(_) => Ok(()),
    }
}

/// A node's capacity as the scheduler counts it: with its `node:<name>` resource.
fn with_affinity(capacity: &Resources, name: &str) -> Resources {
    let affinity = format!("{}{name}", chia_core::resources::NODE_PREFIX);
    if capacity.contains(&affinity) {
        return capacity.clone();
    }
    capacity.clone().with(&affinity, chia_core::ResourceAmount::whole(1)).unwrap_or_else(|_| capacity.clone())
}
