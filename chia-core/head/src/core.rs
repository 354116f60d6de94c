//! The head core: every decision the head makes, as one state machine with no I/O.
//!
//! The driver (the runtime's `head` module) accepts and authenticates connections, decodes
//! frames and feeds them here with the time: [`HeadCore::open_session`], [`HeadCore::handle`],
//! [`HeadCore::heard`], [`HeadCore::close_session`], and [`HeadCore::handle_timeout`] when the
//! deadline of [`HeadCore::poll_timeout`] passes. What the head must do in return — frames to
//! send (already encoded, so a stored value is copied once, straight into its frame),
//! connections to close, state to save — waits in an outbox drained with
//! [`HeadCore::poll_action`], in the order it was decided.

use crate::journal::{JournalEntry, changes_state};
use crate::outbox::{Action, Outbox};
use crate::persist::PersistedService;
use crate::scheduler::{Command, Event, Scheduler, TaskStatus};
use crate::services::{HEAD_SESSION, Services, instance_function, ref_args};
use chia_core::protocol::{
    Arg, BypassSpec, CloseCode, Done, DoneRef, HeadToPeer, HeadToPeerRef, JobSettings, JobSettingsRef,
    Outcome, PROTOCOL_VERSION, PeerToHead, ResumeSession, TaskSpec, ValueRef,
};
use chia_core::{HEAD_NODE_NAME, NodeId, SessionId, TaskError, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Results up to this size travel with the `Done` notice; larger ones wait on the head until
/// the owner asks, so a ref that is only chained never crosses to the driver.
pub const INLINE_RESULT_BYTES: usize = 256 << 10;

/// What the head holds right now (for tests, logs and the benchmark).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeadStats {
    /// Open sessions: drivers and workers, and those of the previous run not taken up yet.
    pub sessions: usize,
    /// Joined worker nodes (the head's own included).
    pub nodes: usize,
    /// Tasks the head keeps a record of: queued, running, or finished with a value someone
    /// can still ask for.
    pub tasks: usize,
    /// Bytes of finished results held.
    pub result_bytes: usize,
}

/// How the core detects failures and what it keeps.
#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// How often workers send a heartbeat (told to each in its welcome).
    pub heartbeat: Duration,
    /// A worker not heard from for this long is written off: nothing more is scheduled there,
    /// its tasks run again elsewhere, its connection is closed.
    pub heartbeat_timeout: Duration,
    /// Keep the specifications of detached services ([`Action::SaveServices`]) so a restarted
    /// head can start them again ([`HeadCore::restore_services`]).
    pub keep_services: bool,
    /// Set when the head keeps a journal: the journal's id (the same across the restarts that
    /// recover from it), told to every peer so it can take up its session after a restart. The core then queues an [`Action::Keep`] for every state
    /// change, before the actions it causes.
    pub journal_id: Option<u64>,
    /// How long a head recovered from its journal keeps the sessions of the previous run for
    /// their peers to take up again; a peer that stays away longer loses its session (its tasks
    /// run elsewhere, its results are freed).
    pub resume_grace: Duration,
    /// The watchdog reports queued tasks that a node had the function and room for, and that
    /// were not placed, once they have waited this long (and were seen so for as long).
    pub stuck_after: Duration,
    /// The head's own node runs in the head's process: calls to its instances are handed
    /// over there ([`Action::CallOwnNode`]) rather than sent as frames.
    pub own_node_in_process: bool,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
            keep_services: false,
            journal_id: None,
            resume_grace: Duration::from_secs(60),
            stuck_after: Duration::from_secs(60),
            own_node_in_process: false,
        }
    }
}

/// Why a peer's first message does not open a session; the driver sends it back as
/// [`HeadToPeer::Rejected`] and closes the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    /// Why, in words the peer is shown.
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Session {
    pub(crate) name: String,
    pub(crate) node: Option<NodeId>,
    /// The host it connected from (no port), when known: a worker that joins asking for the
    /// name this session asked for, from the same host, replaces it.
    #[serde(default)]
    pub(crate) host: Option<String>,
    /// The name its peer asked for, when the head gave it another (`w-2` for `w`).
    #[serde(default)]
    pub(crate) asked_for: Option<String>,
    /// Messages handled from the session so far (the sequence number of the last one).
    pub(crate) frames: u64,
    /// The address it connected from.
    #[serde(default)]
    pub(crate) address: Option<String>,
    /// When it opened (after a restart: when the head recovered it).
    #[serde(skip, default = "crate::snapshot::restored_at")]
    pub(crate) opened: Instant,
    /// What its worker last reported with a heartbeat.
    #[serde(skip)]
    pub(crate) figures: Option<Box<chia_core::protocol::WorkerFigures>>,
    /// Recovered from the journal and not taken up again yet: until this deadline its frames
    /// wait in `held`, then the session is closed.
    #[serde(skip)]
    pub(crate) detached_until: Option<Instant>,
    #[serde(skip)]
    pub(crate) held: Vec<Vec<u8>>,
    /// Taken up again after a restart: the grace deadline it had, and its frame count then.
    #[serde(skip)]
    pub(crate) resumed: Option<(Instant, u64)>,
    /// Its name was handed to the worker that replaces it, which joins before this session is
    /// closed: closing it must not give the name up a second time.
    #[serde(skip)]
    pub(crate) name_passed_on: bool,
}

impl Session {
    fn new(now: Instant, name: String, node: Option<NodeId>) -> Session {
        Session {
            name,
            node,
            host: None,
            asked_for: None,
            frames: 0,
            address: None,
            opened: now,
            figures: None,
            detached_until: None,
            held: Vec::new(),
            resumed: None,
            name_passed_on: false,
        }
    }
}

/// A submitted task and, once it ends, its result.
#[derive(Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    pub(crate) owner: SessionId,
    pub(crate) function: String,
    pub(crate) tag: Option<String>,
    /// The arguments (refs are resolved at each dispatch), kept until the task ends: if its
    /// node is lost, it is sent again.
    pub(crate) args: Vec<Arg>,
    pub(crate) deps: Vec<TaskId>,
    /// The job whose settings the task is sent with: its owner's, or for a nested call its
    /// driver's.
    pub(crate) job: SessionId,
    /// What replaces the function, when the caller bypassed the call (boxed: most are not).
    pub(crate) bypass: Option<Box<BypassSpec>>,
    pub(crate) running_on: Option<NodeId>,
    /// The run it is on (functions only; 1 for the first): a report of another is stale.
    pub(crate) attempt: u32,
    /// How long each run may take on its worker (milliseconds), sent with every `Execute`.
    #[serde(default)]
    pub(crate) timeout_ms: Option<u64>,
    pub(crate) outcome: Option<Outcome>,
    /// The owner still holds an `ObjectRef` to it.
    pub(crate) owner_holds: bool,
    /// Submitted tasks that take this one as an argument and have not ended yet.
    pub(crate) dependents: u32,
    pub(crate) kind: TaskKind,
    /// The scheduler heard of it (a function task that waited for service calls may end
    /// before it does).
    pub(crate) scheduled: bool,
    /// Its place in the order records were made, across sessions (listings are newest first).
    #[serde(default)]
    pub(crate) order: u64,
    /// When it was submitted (after a restart: when the head recovered it).
    #[serde(skip, default = "crate::snapshot::restored_at")]
    pub(crate) submitted_at: Instant,
    /// Its runs so far (function tasks; not kept in a snapshot).
    #[serde(skip)]
    pub(crate) runs: Vec<crate::observe::Run>,
    /// Bytes of the arguments given as values (kept after the arguments are dropped).
    #[serde(default)]
    pub(crate) argument_bytes: u64,
}

impl TaskRecord {
    /// A record of a request `owner` made, not placed yet, held by its owner, taking `args`
    /// (whose refs are `deps`); part of the owner's own job, not bypassed.
    pub(crate) fn new(
        now: Instant,
        owner: SessionId,
        function: String,
        args: Vec<Arg>,
        deps: Vec<TaskId>,
        kind: TaskKind,
    ) -> TaskRecord {
        let argument_bytes = crate::observe::value_bytes(&args);
        TaskRecord {
            owner,
            function,
            tag: None,
            args,
            deps,
            job: owner,
            bypass: None,
            running_on: None,
            attempt: 0,
            timeout_ms: None,
            outcome: None,
            owner_holds: true,
            dependents: 0,
            kind,
            scheduled: false,
            order: 0,
            submitted_at: now,
            runs: Vec::new(),
            argument_bytes,
        }
    }
}

/// What a task record stands for.
#[derive(Serialize, Deserialize)]
pub(crate) enum TaskKind {
    /// A function call, placed by the scheduler.
    Function,
    /// The placement of a service instance; it runs (holding its resources) until the service
    /// stops.
    ServiceStart(chia_core::ServiceId),
    /// A method call, sent to the instance's node once `missing` arguments are ready.
    ServiceCall { service: chia_core::ServiceId, name: String, method: String, missing: usize },
}

/// The head's state and decisions; see the module documentation. A snapshot
/// ([`HeadCore::snapshot`]) keeps what a replay of the journal would rebuild: not the
/// options, the outbox, nor anything about time or sessions waiting to be taken up.
#[derive(Serialize, Deserialize)]
pub struct HeadCore {
    pub(crate) scheduler: Scheduler,
    pub(crate) sessions: HashMap<SessionId, Session>,
    /// The names of open sessions (with how many hold each: a driver's `driver-N` is not
    /// checked against workers' names), and the next number to try after each name asked for
    /// twice.
    names: HashMap<String, usize>,
    next_suffix: HashMap<String, u64>,
    /// The session of each node, and the head's own node (never written off).
    pub(crate) nodes: HashMap<NodeId, SessionId>,
    pub(crate) head_node: Option<NodeId>,
    pub(crate) tasks: HashMap<TaskId, TaskRecord>,
    pub(crate) next_session: u64,
    pub(crate) next_node: u64,
    pub(crate) last_infeasible: Option<String>,
    /// Sessions whose peer does not take what is sent to it fast enough (the driver says so):
    /// their results are announced, not pushed, and wait on the head until fetched.
    #[serde(skip)]
    pub(crate) congested: HashSet<SessionId>,
    pub(crate) services: Services,
    /// Settings of jobs (by driver session) that their tasks carry.
    pub(crate) jobs: HashMap<SessionId, JobSettings>,
    /// The head is closing every connection: what ends now ends on purpose, not by failure.
    #[serde(skip)]
    pub(crate) shutting_down: bool,
    /// The previous run's own node is being closed after a restart: the services it hosted
    /// died with that head, and are kept to start again.
    #[serde(skip)]
    pub(crate) head_died: bool,
    #[serde(skip)]
    pub(crate) options: CoreOptions,
    /// Detached services to start again after a restart, by (namespace, name), when kept.
    pub(crate) persisted: Option<BTreeMap<(String, String), PersistedService>>,
    #[serde(skip)]
    pub(crate) outbox: Outbox,
    /// After a recovery, until the grace period ends: when the sessions of the previous run
    /// that were not taken up again are closed.
    #[serde(skip)]
    pub(crate) grace_until: Option<Instant>,
    /// The time of the input being handled: everything decided meanwhile happens then.
    #[serde(skip, default = "crate::snapshot::restored_at")]
    pub(crate) now: Instant,
    /// What `chia status` and the metrics read, kept as things happen (rebuilt after a
    /// recovery: counts since this head started).
    #[serde(skip, default = "crate::observe::Observer::restored")]
    pub(crate) observer: crate::observe::Observer,
    /// `ready` requests waiting for their placement group (not kept: asked again after a
    /// restart).
    #[serde(skip)]
    pub(crate) group_waiters: HashMap<chia_core::placement::GroupId, Vec<(SessionId, TaskId)>>,
}

impl HeadCore {
    /// A head with no session yet, at `now`.
    pub fn new(now: Instant, options: CoreOptions) -> HeadCore {
        HeadCore {
            persisted: options.keep_services.then(BTreeMap::new),
            options,
            scheduler: Scheduler::new(),
            sessions: HashMap::new(),
            names: HashMap::new(),
            next_suffix: HashMap::new(),
            nodes: HashMap::new(),
            head_node: None,
            tasks: HashMap::new(),
            next_session: 1,
            next_node: 1,
            last_infeasible: None,
            congested: HashSet::new(),
            services: Services::default(),
            jobs: HashMap::new(),
            shutting_down: false,
            head_died: false,
            outbox: Outbox::default(),
            grace_until: None,
            now,
            observer: crate::observe::Observer::new(now),
            group_waiters: HashMap::new(),
        }
    }

    /// A snapshot of what the head holds now.
    pub fn stats(&self) -> HeadStats {
        HeadStats {
            sessions: self.sessions.len(),
            nodes: self.nodes.len(),
            tasks: self.tasks.len(),
            result_bytes: self.observer.result_bytes() as usize,
        }
    }

    /// The scheduler inside, for queries (tests, the simulator's invariants).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The options the core was made with.
    pub fn options(&self) -> &CoreOptions {
        &self.options
    }

    /// The name the head gave a session (`driver-N`, a worker's unique node name).
    pub fn session_name(&self, session: SessionId) -> Option<&str> {
        self.sessions.get(&session).map(|s| s.name.as_str())
    }

    /// The next thing the head must do, in the order it was decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        loop {
            let action = self.outbox.pop()?;
            if let Action::Send { to, frame } = action {
                match self.sessions.get_mut(&to) {
                    Some(session) if session.detached_until.is_some() => session.held.push(frame),
                    _ => return Some(Action::Send { to, frame }),
                }
                continue;
            }
            return Some(action);
        }
    }

    /// When [`HeadCore::handle_timeout`] must next run, if nothing else happens before: the
    /// moment the longest-silent worker would be written off, or the watchdog's next look
    /// while tasks are queued.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.scheduler.next_expiry(self.options.heartbeat_timeout);
        expiry.into_iter().chain(self.grace_until).chain(self.watchdog_deadline()).min()
    }

    /// The deadline of [`HeadCore::poll_timeout`] passed: writes off the workers not heard
    /// from in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        // The head's own node lives and dies with this process: it is never written off; nor is
        // a node waiting to be taken up again (its grace period decides).
        let mut exempt: Vec<NodeId> = self.head_node.into_iter().collect();
        exempt.extend(self.sessions.values().filter(|s| s.detached_until.is_some()).filter_map(|s| s.node));
        exempt.sort_unstable();
        for node in exempt {
            self.scheduler.handle(now, Event::NodeHeard { node });
        }
        // Written off by closing their sessions: the same input the journal keeps, so a replay
        // decides exactly what this run did.
        let timeout = self.options.heartbeat_timeout;
        for node in self.scheduler.silent_nodes(now, timeout) {
            let Some(&session) = self.nodes.get(&node) else { continue };
            let name = self.session_name(session).unwrap_or("?").to_string();
            tracing::warn!(
                "worker {name} ({node}) was not heard from for {timeout:?}; its tasks run elsewhere, closing its connection"
            );
            self.close(session, "not heard from in time");
        }
        self.end_expired_graces(now);
        self.watchdog_look(now);
    }

    /// Bytes arrived from `session` although no whole frame did (a large one is on its way):
    /// the node is alive.
    pub fn heard(&mut self, now: Instant, session: SessionId) {
        self.now = now;
        if let Some(node) = self.sessions.get(&session).and_then(|s| s.node) {
            self.scheduler.handle(now, Event::NodeHeard { node });
        }
    }

    /// The head is stopping: services that end now end on purpose, not by failure.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// The welcome of `session` (its node, if a worker's), naming the journal when the session
    /// can be taken up after a restart; `resumed_through`: the frames of it the head has.
    pub(crate) fn welcome(
        &self,
        session: SessionId,
        node: Option<NodeId>,
        name: &str,
        resumable: bool,
        resumed_through: u64,
    ) -> HeadToPeer {
        HeadToPeer::Welcome {
            protocol_version: PROTOCOL_VERSION,
            session,
            node,
            node_name: name.to_string(),
            heartbeat_ms: if node.is_some() { self.options.heartbeat.as_millis() as u64 } else { 0 },
            journal_id: self.options.journal_id.filter(|_| resumable),
            resumed_through,
            resume_grace_ms: self.resume_grace_ms(),
        }
    }

    /// What a welcome says of the grace period: 0 without a journal (nothing to resume).
    pub(crate) fn resume_grace_ms(&self) -> u64 {
        self.options.journal_id.map_or(0, |_| self.options.resume_grace.as_millis() as u64)
    }

    /// Whether `session`'s peer is behind in taking what the head sends it. While it is, its
    /// results are announced as stored rather than pushed (it fetches each when it asks for
    /// it), so a slow driver slows its own results and does not grow the head's memory. It
    /// changes only how a result travels, not the head's state: it is not journaled.
    pub fn set_congested(&mut self, session: SessionId, congested: bool) {
        if congested {
            self.congested.insert(session);
        } else {
            self.congested.remove(&session);
        }
    }

    /// Whether [`HeadCore::shut_down`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Sets the time of the input being handled.
    pub(crate) fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    pub(crate) fn feed(&mut self, event: Event) {
        self.scheduler.handle(self.now, event);
        self.run_commands();
    }

    /// Carries out what the scheduler decided, in order.
    fn run_commands(&mut self) {
        let commands: Vec<Command> = self.scheduler.drain_commands().collect();
        for command in commands {
            self.execute(command);
        }
    }

    /// A peer's first message: a [`PeerToHead::Hello`] of this protocol version opens its
    /// session (a worker's also joins its node) and queues its welcome. `remote` names the
    /// peer in logs.
    pub fn open_session(
        &mut self,
        now: Instant,
        remote: &str,
        first: PeerToHead,
    ) -> Result<SessionId, Rejection> {
        self.open_session_from(now, remote, host_of(remote), first)
    }

    /// [`HeadCore::open_session`] of a peer on `host` (which a journal replay knows, with no
    /// address to take it from): a worker replaces its predecessor on that host the same way.
    pub(crate) fn open_session_from(
        &mut self,
        now: Instant,
        remote: &str,
        host: Option<&str>,
        first: PeerToHead,
    ) -> Result<SessionId, Rejection> {
        self.now = now;
        let kept = self.options.journal_id.is_some().then(|| first.clone());
        let (name, worker) = match first {
            PeerToHead::Hello { protocol_version, name, worker } if protocol_version == PROTOCOL_VERSION => {
                (name, worker)
            }
            // The session keeps the host it opened from (journaled with its hello): a replay,
            // from a snapshot or from the whole journal, sees the same.
            PeerToHead::Resume(resume) if resume.protocol_version == PROTOCOL_VERSION => {
                return self.resume(resume);
            }
            PeerToHead::Resume(ResumeSession { protocol_version, .. }) => {
                return Err(Rejection {
                    reason: format!(
                        "protocol version {protocol_version} is not supported; this head speaks version {PROTOCOL_VERSION}"
                    ),
                });
            }
            PeerToHead::Hello { protocol_version, .. } => {
                return Err(Rejection {
                    reason: format!(
                        "protocol version {protocol_version} is not supported; this head speaks version {PROTOCOL_VERSION}"
                    ),
                });
            }
            _ => return Err(Rejection { reason: "the first message must be a hello".into() }),
        };
        if let Some(offer) = &worker {
            check_offer(offer)?;
        }
        let predecessors = match (host, &worker) {
            (Some(host), Some(offer)) if !offer.head_node => self.predecessors(&name, host),
            _ => Vec::new(),
        };
        // The successor takes its predecessor's name, but its predecessor is closed only once
        // it has joined: what the predecessor ran (a service that restarts, a task retried)
        // then finds the functions the successor offers, rather than failing as unknown.
        for old in &predecessors {
            self.pass_name_on(*old);
        }
        let session = SessionId(self.next_session);
        self.next_session += 1;
        if let Some(hello) = kept {
            let host = host.map(str::to_string);
            self.outbox.push(Action::Keep(JournalEntry::Opened { session, hello, host }));
        }
        let asked = name.clone();
        let replacing = if predecessors.is_empty() { String::new() } else { name.clone() };
        let (node, name) = match &worker {
            Some(offer) => {
                let node = NodeId(self.next_node);
                self.next_node += 1;
                let name = if offer.head_node && self.head_node.is_none() {
                    self.head_node = Some(node);
                    HEAD_NODE_NAME.to_string()
                } else {
                    self.unique_node_name(&name)
                };
                (Some(node), name)
            }
            None => (None, format!("driver-{}", session.0)),
        };
        // The head's own node dies with the head: it has no session to take up.
        let resumable = node.is_none() || node != self.head_node;
        let welcome = self.welcome(session, node, &name, resumable, 0);
        self.outbox.send(session, &welcome);
        tracing::info!(
            "{name} joined from {remote} as {session}{}",
            match &worker {
                Some(offer) => format!(
                    " with {}, {} function(s) and {} service type(s)",
                    offer.resources,
                    offer.functions.len(),
                    offer.services.len()
                ),
                None => String::new(),
            }
        );
        *self.names.entry(name.clone()).or_default() += 1;
        let asked_for = (worker.is_some() && name != asked).then_some(asked);
        self.sessions.insert(
            session,
            Session {
                host: host.map(str::to_string),
                asked_for,
                address: host_of(remote).is_some().then(|| remote.to_string()),
                ..Session::new(now, name.clone(), node)
            },
        );
        if let (Some(node), Some(offer)) = (node, worker) {
            self.nodes.insert(node, session);
            let mut functions = offer.functions;
            functions.extend(offer.services.iter().map(instance_function));
            let labels = offer.labels;
            // A successor joins paused until its predecessor is closed (below), so that nothing
            // is placed on both as if they were two machines.
            let paused = !predecessors.is_empty();
            let resources = offer.resources;
            self.feed(Event::NodeJoined { node, name, resources, functions, labels, paused });
            if self.head_node == Some(node) && !self.services.to_restore.is_empty() {
                let kept = std::mem::take(&mut self.services.to_restore);
                self.restore_services(now, kept);
            }
        }
        let replaced = !predecessors.is_empty();
        for old in predecessors {
            let host = host.unwrap_or_default();
            tracing::warn!(
                "worker {replacing} joined again from {host}: its previous session {old} is closed and what it ran runs again"
            );
            self.close_with(
                old,
                &format!("replaced by a worker named {replacing} that joined from {host}"),
                CloseCode::Replaced,
            );
        }
        if let Some(node) = node.filter(|_| replaced) {
            // What the predecessors ran is queued again by now: it comes first.
            self.feed(Event::NodeResumed { node });
        }
        Ok(session)
    }

    /// A worker joins as `name` from `host`: a worker session of that name from that host is
    /// its predecessor — the same worker restarted, or cut off and given up — whose node would
    /// otherwise keep its tasks, and be sent new ones, until it is written off. It is closed
    /// once its successor has joined, told it was replaced so it does not join again if it
    /// still lives.
    fn predecessors(&self, name: &str, host: &str) -> Vec<SessionId> {
        let mut predecessors: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.node.is_some() && s.node != self.head_node)
            .filter(|(_, s)| s.asked_for.as_deref().unwrap_or(&s.name) == name)
            .filter(|(_, s)| s.host.as_deref() == Some(host))
            .map(|(&session, _)| session)
            .collect();
        predecessors.sort_unstable();
        predecessors
    }

    /// `old`'s name is free for its successor from now on (see [`HeadCore::predecessors`]).
    fn pass_name_on(&mut self, old: SessionId) {
        let Some(session) = self.sessions.get_mut(&old) else { return };
        if std::mem::replace(&mut session.name_passed_on, true) {
            return;
        }
        release_name(&mut self.names, &session.name);
    }

    /// The name a joining worker that asked for `wanted` gets: `wanted` if free, else the next
    /// `wanted-N` (numbers are not given twice, so a name is found without a scan).
    fn unique_node_name(&mut self, wanted: &str) -> String {
        let base = if wanted.is_empty() || wanted == HEAD_NODE_NAME { "worker" } else { wanted };
        if !self.names.contains_key(base) {
            return base.to_string();
        }
        let next = self.next_suffix.entry(base.to_string()).or_insert(2);
        loop {
            let name = format!("{base}-{next}");
            *next += 1;
            if !self.names.contains_key(&name) {
                return name;
            }
        }
    }

    /// A message from an open session. Nothing a peer sends makes this panic; what it may not
    /// do is ignored with a log line.
    pub fn handle(&mut self, now: Instant, session: SessionId, message: PeerToHead) {
        self.now = now;
        let Some(peer) = self.sessions.get_mut(&session) else {
            // Closed (written off) between the frame's decoding and now: nothing it says counts.
            return;
        };
        peer.frames += 1;
        if self.options.journal_id.is_some() && changes_state(&message) {
            let seq = peer.frames;
            self.outbox.push(Action::Keep(JournalEntry::Message { session, seq, message: message.clone() }));
        }
        if let Some(node) = peer.node {
            // Any frame shows the node is alive; heartbeats only fill the silences.
            self.scheduler.handle(now, Event::NodeHeard { node });
        }
        match message {
            PeerToHead::Submit(spec) => self.submit(session, spec),
            PeerToHead::Release { tasks } => {
                for task in tasks {
                    if let Some(record) = self.tasks.get_mut(&task)
                        && record.owner == session
                    {
                        record.owner_holds = false;
                        self.maybe_free(task);
                    }
                }
            }
            PeerToHead::Fetch { task } => {
                let outcome = self.tasks.get(&task).and_then(|r| r.outcome.as_ref()).map(Outcome::as_ref);
                let sent = self.outbox.send_checked(session, &HeadToPeerRef::Fetched { task, outcome });
                self.value_not_sent(session, task, sent);
            }
            PeerToHead::Started { task, attempt } => {
                if let Some(node) = self.sessions.get(&session).and_then(|s| s.node)
                    && self
                        .tasks
                        .get(&task)
                        .is_some_and(|r| r.running_on == Some(node) && r.attempt == attempt)
                {
                    if let Some(record) = self.tasks.get_mut(&task) {
                        crate::observe::run_started(self.now, record);
                    }
                    self.feed(Event::TaskStarted { task, node });
                }
            }
            PeerToHead::Finished { task, attempt, outcome } => self.finished(session, task, attempt, outcome),
            PeerToHead::Blocked { task } => {
                if self.runs_on_session(task, session) {
                    self.feed(Event::TaskBlocked { task });
                }
            }
            PeerToHead::Ping { nonce } => self.outbox.send(session, &HeadToPeer::Pong { nonce }),
            PeerToHead::StartService(start) => self.start_service(session, start),
            PeerToHead::LookupService { task, name, namespace } => {
                self.lookup_service(session, task, &name, &namespace)
            }
            PeerToHead::CallService { task, service, name, method, args } => {
                self.call_service(session, task, service, &name, method, args)
            }
            PeerToHead::StopService { task, service } => self.stop_service_request(session, task, service),
            PeerToHead::WatchResults { task, method, rules } => {
                self.watch_results(session, task, method, rules)
            }
            PeerToHead::InstanceStopped { service } => self.instance_stopped(session, service),
            PeerToHead::SetJobSettings(settings) => self.set_job_settings(session, settings),
            PeerToHead::Cancel { task, force } => {
                if self.tasks.get(&task).is_some_and(|r| r.owner == session) {
                    self.cancel(task, force);
                }
            }
            PeerToHead::Heartbeat => {}
            PeerToHead::Figures(figures) => {
                // Only a node's figures are shown; a driver's would be memory for nothing.
                if let Some(peer) = self.sessions.get_mut(&session).filter(|peer| peer.node.is_some()) {
                    peer.figures = Some(Box::new(crate::observe::bounded_figures(figures)));
                }
            }
            PeerToHead::Inspect { task, query } => {
                let answer = self.answer(session, &query);
                self.reply(session, task, Ok(&answer));
            }
            PeerToHead::CreateGroup(spec) => self.create_group(session, spec),
            PeerToHead::GroupReady { task, group } => self.group_ready(session, task, group),
            PeerToHead::RemoveGroup { task, group } => self.remove_group(session, task, group),
            PeerToHead::CancelTasks { task, target, force, stop_services } => {
                let cancelled = self.cancel_tasks(&target, force, stop_services);
                self.reply(session, task, Ok(&cancelled));
            }
            PeerToHead::Hello { .. } | PeerToHead::Resume(_) => {
                tracing::warn!("{session} sent a second hello; ignored")
            }
        }
    }

    /// Cancels a function task that has not ended: dropped if it has not started, told to stop
    /// if it runs. Returns whether it was one to cancel.
    pub(crate) fn cancel(&mut self, task: TaskId, force: bool) -> bool {
        let Some(record) = self.tasks.get(&task) else { return false };
        if !matches!(record.kind, TaskKind::Function) || record.outcome.is_some() {
            return false;
        }
        if self.services.deferred.remove(&task).is_some() {
            // Still waiting for a service call: the scheduler never heard of it.
            let function = record.function.clone();
            self.release_deps(task);
            self.settle(task, Outcome::Failed(TaskError::Cancelled { function }));
        } else {
            self.feed(Event::TaskCancelled { task, force });
        }
        true
    }

    pub(crate) fn runs_on_session(&self, task: TaskId, session: SessionId) -> bool {
        let node = self.sessions.get(&session).and_then(|s| s.node);
        node.is_some() && self.tasks.get(&task).is_some_and(|r| r.running_on == node)
    }

    fn submit(&mut self, session: SessionId, spec: TaskSpec) {
        let task = spec.task;
        if task.session() != session {
            tracing::warn!("{session} submitted {task}, which belongs to another session; ignored");
            return;
        }
        if self.tasks.contains_key(&task) {
            tracing::warn!("{session} submitted {task} twice; the second is ignored");
            return;
        }
        let deps = ref_args(&spec.args);
        self.hold_deps(&deps);
        let record = TaskRecord {
            tag: spec.tag,
            job: spec.job.unwrap_or(session),
            bypass: spec.bypass,
            timeout_ms: spec.timeout_ms,
            ..TaskRecord::new(
                self.now,
                session,
                spec.function.name.clone(),
                spec.args,
                deps.clone(),
                TaskKind::Function,
            )
        };
        tracing::debug!(
            task = %task,
            function = %record.function,
            tag = record.tag.as_deref(),
            job = %record.job,
            "task submitted"
        );
        self.add_record(task, record);
        let submitted = Event::TaskSubmitted {
            task,
            function: spec.function,
            request: spec.request,
            deps,
            max_retries: spec.max_retries,
            retry_exceptions: spec.retry_exceptions,
            placement: spec.placement,
        };
        self.submit_when_calls_end(task, submitted);
    }

    /// Keeps the values of `deps` until the task that takes them ends: it may be sent again.
    pub(crate) fn hold_deps(&mut self, deps: &[TaskId]) {
        for dep in deps {
            if let Some(record) = self.tasks.get_mut(dep) {
                record.dependents += 1;
            }
        }
    }

    pub(crate) fn finished(&mut self, session: SessionId, task: TaskId, attempt: u32, outcome: Outcome) {
        if !self.runs_on_session(task, session) {
            tracing::warn!("{session} reported {task}, which it is not running; ignored");
            return;
        }
        let Some(record) = self.tasks.get_mut(&task) else { return };
        let Some(node) = record.running_on else { return };
        tracing::debug!(
            task = %task,
            node = %node,
            attempt,
            failed = matches!(outcome, Outcome::Failed(_)),
            "task reported"
        );
        if record.attempt != attempt {
            // An earlier run on the same node (it was written off, thawed and joined again as
            // the same session cannot, but a restarted attempt can land on the same node).
            tracing::warn!(
                "{session} reported attempt {attempt} of {task}, which runs attempt {} now; ignored",
                record.attempt
            );
            return;
        }
        match record.kind {
            TaskKind::ServiceStart(service) => self.instance_started(task, service, outcome),
            TaskKind::ServiceCall { .. } => {
                record.running_on = None;
                self.settle(task, outcome);
            }
            TaskKind::Function => {
                record.running_on = None;
                let cancelled = self.scheduler.is_cancelled(task);
                let end = if cancelled {
                    crate::observe::RunEnd::Cancelled
                } else {
                    crate::observe::RunEnd::Reported(&outcome)
                };
                crate::observe::run_ended(self.now, record, end);
                match outcome {
                    // Its owner asked for it to stop: it ends cancelled, whatever it returned.
                    Outcome::Value(_) if cancelled => {
                        self.feed(Event::TaskFinished { task, node, error: None })
                    }
                    Outcome::Value(value) => {
                        let (function, tag) = (record.function.clone(), record.tag.clone());
                        self.deliver_to_watchers(task, &function, tag.as_deref(), &value);
                        // Stored before the scheduler hears, so dependents it starts find it.
                        self.settle(task, Outcome::Value(value));
                        self.feed(Event::TaskFinished { task, node, error: None });
                    }
                    Outcome::Failed(error) => {
                        // The scheduler decides first: the task may run again, or end otherwise
                        // than its node says (cancelled; then it has told the owner already).
                        self.feed(Event::TaskFinished { task, node, error: Some(error.clone()) });
                        let again = matches!(
                            self.scheduler.task_status(task),
                            Some(TaskStatus::Queued | TaskStatus::Running { .. })
                        );
                        let settled = self.tasks.get(&task).is_none_or(|r| r.outcome.is_some());
                        if again {
                            tracing::debug!(task = %task, node = %node, %error, "the task failed and is queued again");
                        } else if !settled {
                            self.settle(task, Outcome::Failed(error));
                        }
                    }
                }
            }
        }
    }

    /// Stores a task's outcome and tells its owner.
    pub(crate) fn settle(&mut self, task: TaskId, outcome: Outcome) {
        let Some(record) = self.tasks.get_mut(&task) else { return };
        if let (HEAD_SESSION, Outcome::Failed(error)) = (record.owner, &outcome) {
            tracing::warn!(task = %task, function = %record.function, %error, "a task of the head failed");
        }
        self.observer.settled(self.now, record, &outcome);
        record.outcome = Some(outcome);
        // It ended, so it is not sent again: its arguments and the values it took can go.
        record.args = Vec::new();
        self.release_deps(task);
        // A result being written to a watching service (the cache) is announced once the
        // write is done, so whoever sees the result also finds it cached.
        if !self.services.announce_waits(task) {
            self.announce(task);
        }
        self.written_for_watcher(task);
        self.dependency_settled(task);
        self.maybe_free(task);
    }

    /// Tells a task's owner how it ended.
    pub(crate) fn announce(&mut self, task: TaskId) {
        let Some(record) = self.tasks.get(&task) else { return };
        #[cfg(test)]
        if crate::planted::planted() == Some(crate::planted::PlantedBug::ForgetDoneOnRetry)
            && record.attempt > 1
        {
            return;
        }
        let Some(outcome) = record.outcome.as_ref().filter(|_| record.owner_holds) else { return };
        let owner = record.owner;
        let done = match outcome {
            Outcome::Value(value)
                if value.len() <= INLINE_RESULT_BYTES && !self.congested.contains(&owner) =>
            {
                DoneRef::Value(ValueRef(value))
            }
            Outcome::Value(value) => DoneRef::Stored { len: value.len() as u64 },
            Outcome::Failed(error) => DoneRef::Failed(error),
        };
        let sent = self.outbox.send_checked(owner, &HeadToPeerRef::Done { task, done });
        self.value_not_sent(owner, task, sent);
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Dispatch { task, node, attempt } => self.dispatch(task, node, attempt),
            Command::Fail { task, error } => {
                tracing::debug!(task = %task, %error, "the task cannot run");
                self.release_deps(task);
                match self.tasks.get(&task).map(|r| &r.kind) {
                    Some(TaskKind::ServiceStart(service)) => self.instance_task_failed(task, *service, error),
                    _ => self.settle(task, Outcome::Failed(error)),
                }
            }
            Command::Infeasible { task, reason } => {
                // Many tasks of one shape share a reason: say it once, not once per task.
                if self.last_infeasible.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(task = %task, %reason, "the task (and others like it) cannot run on any node now");
                    self.last_infeasible = Some(reason.clone());
                }
                if let Some((owner, kind)) = self.tasks.get(&task).map(|r| (r.owner, &r.kind)) {
                    if let TaskKind::ServiceStart(service) = *kind {
                        self.instance_unplaceable(service, &reason);
                    }
                    // The head's own requests (restarts) have no session to tell.
                    if owner != HEAD_SESSION {
                        self.outbox.send(owner, &HeadToPeer::Infeasible { task, reason });
                    }
                }
            }
            Command::Cancel { task, node, force } => {
                // It ends when its node reports it; the scheduler records it as cancelled then.
                if let Some(&session) = self.nodes.get(&node) {
                    self.outbox.send(session, &HeadToPeer::Cancel { task, force });
                }
            }
            Command::GroupPlaced { group, nodes } => self.group_placed(group, nodes),
            Command::GroupInfeasible { group, reason } => {
                self.group_not_ready(group, chia_core::placement::GroupProblem::Infeasible { reason })
            }
            Command::GroupRemoved { group } => {
                self.group_not_ready(group, chia_core::placement::GroupProblem::Removed)
            }
            Command::NodeExpired { node } => {
                if let Some(&session) = self.nodes.get(&node) {
                    // The scheduler has written the node off already; close what is left of it.
                    let name = self.sessions.get(&session).map_or("?", |s| s.name.as_str());
                    tracing::warn!(
                        "worker {name} ({node}) was not heard from for {:?}; its tasks run elsewhere, closing its connection",
                        self.options.heartbeat_timeout
                    );
                    self.close(session, "not heard from in time");
                }
            }
        }
    }

    fn dispatch(&mut self, task: TaskId, node: NodeId, attempt: u32) {
        let Some(session) = self.nodes.get(&node).copied() else {
            tracing::error!("the scheduler dispatched {task} to {node}, which has no session");
            return;
        };
        let Some(record) = self.tasks.get_mut(&task) else {
            // Freed while it waited (a service stopped before it was placed): hand the
            // resources straight back.
            tracing::debug!("{task} was placed after it was dropped; releasing its resources");
            self.feed(Event::TaskFinished { task, node, error: None });
            self.feed(Event::TaskForgotten { task });
            return;
        };
        if let TaskKind::ServiceStart(service) = record.kind {
            // An instance's losses are counted by its restarts (`max_restarts`), not here.
            self.scheduler.handle(self.now, Event::TaskStarted { task, node });
            return self.dispatch_instance(task, service, node, session);
        }
        record.running_on = Some(node);
        record.attempt = attempt;
        let node_name = self.sessions.get(&session).map_or("?", |s| s.name.as_str());
        tracing::debug!(task = %task, function = %record.function, node = node_name, attempt, "task dispatched");
        self.observer.dispatched(self.now, record, attempt, node_name);
        let Err(e) = self.send_execute(task, session) else { return };
        // The arguments together exceed what a frame may carry: the task can never be sent.
        let name = self.tasks.get(&task).map(|r| r.function.clone()).unwrap_or_default();
        let error =
            TaskError::InvalidCall { function: name, message: format!("its arguments cannot be sent: {e}") };
        if let Some(record) = self.tasks.get_mut(&task) {
            record.running_on = None;
        }
        self.feed(Event::TaskFinished { task, node, error: Some(error.clone()) });
        self.settle(task, Outcome::Failed(error));
    }

    /// Sends `task` to `session`, its node, for the attempt it records.
    pub(crate) fn send_execute(
        &mut self,
        task: TaskId,
        session: SessionId,
    ) -> Result<(), chia_core::protocol::ProtocolError> {
        let Some(record) = self.tasks.get(&task) else { return Ok(()) };
        let attempt = record.attempt;
        let values = arg_values(&self.tasks, task, &record.args);
        let job = self.jobs.get(&record.job).map(|job| JobSettingsRef {
            job: job.job,
            revision: job.revision,
            settings: ValueRef(&job.settings),
        });
        let execute = HeadToPeerRef::Execute {
            task,
            attempt,
            function: &record.function,
            args: values,
            tag: record.tag.as_deref(),
            bypass: record.bypass.as_deref(),
            job,
            timeout_ms: record.timeout_ms,
        };
        self.outbox.send_checked(session, &execute)
    }

    /// The task no longer needs its dependencies' values.
    pub(crate) fn release_deps(&mut self, task: TaskId) {
        let deps = self.tasks.get_mut(&task).map(|r| std::mem::take(&mut r.deps)).unwrap_or_default();
        for dep in deps {
            if let Some(record) = self.tasks.get_mut(&dep) {
                record.dependents = record.dependents.saturating_sub(1);
                self.maybe_free(dep);
            }
        }
    }

    /// Frees a finished task's record once nobody can ask for its value any more.
    pub(crate) fn maybe_free(&mut self, task: TaskId) {
        let Some(record) = self.tasks.get(&task) else { return };
        if record.owner_holds
            || record.dependents > 0
            || record.outcome.is_none()
            || self.services.announce_waits(task)
        {
            return;
        }
        self.remove_record(task);
        self.feed(Event::TaskForgotten { task });
    }

    fn set_job_settings(&mut self, session: SessionId, settings: JobSettings) {
        if settings.job != session {
            tracing::warn!("{session} sent settings for the job of {}; ignored", settings.job);
            return;
        }
        let newer = self.jobs.get(&session).is_none_or(|current| current.revision < settings.revision);
        if newer {
            self.jobs.insert(session, settings);
        }
    }

    /// The peer's connection ended (it closed, failed, or sent what cannot be read): what it
    /// ran is lost, what it owned is dropped or stopped. Nothing happens for a session that is
    /// closed already.
    pub fn close_session(&mut self, now: Instant, session: SessionId, reason: &str) {
        self.now = now;
        if !self.detach_again(now, session) {
            self.close(session, reason);
        }
    }

    pub(crate) fn close(&mut self, session: SessionId, reason: &str) {
        self.close_with(session, reason, CloseCode::Ended);
    }

    pub(crate) fn close_with(&mut self, session: SessionId, reason: &str, code: CloseCode) {
        let Some(closed) = self.sessions.remove(&session) else { return };
        if !closed.name_passed_on {
            release_name(&mut self.names, &closed.name);
        }
        if self.options.journal_id.is_some() {
            self.outbox.push(Action::Keep(JournalEntry::Closed { session, reason: reason.to_string() }));
        }
        if closed.node.is_some() && closed.node == self.head_node {
            self.head_node = None;
        }
        self.jobs.remove(&session);
        self.congested.remove(&session);
        self.observer.session_closed(session);
        tracing::info!("{} ({session}) left: {reason}", closed.name);
        self.outbox.close(session, reason, code);
        self.forget_group_waiters(session);
        self.stop_services_of(session);
        if let Some(node) = closed.node {
            self.fail_calls_on(node, &closed.name);
            // The scheduler runs its tasks again or fails them; until one is sent again it runs
            // nowhere (so its owner leaving drops it).
            for record in self.tasks.values_mut() {
                if record.running_on == Some(node) && matches!(record.kind, TaskKind::Function) {
                    record.running_on = None;
                    crate::observe::run_ended(self.now, record, crate::observe::RunEnd::WorkerLost);
                }
            }
            self.nodes.remove(&node);
            self.feed(Event::NodeLost { node });
        }
        self.feed(Event::SessionClosed { session });
        let mut owned: Vec<TaskId> =
            self.tasks.iter().filter(|(_, r)| r.owner == session).map(|(t, _)| *t).collect();
        // In submission order, whatever the map's: one input sequence, one output sequence.
        owned.sort_unstable();
        for task in owned {
            if let Some(record) = self.tasks.get_mut(&task) {
                record.owner_holds = false;
                if record.outcome.is_none() && record.running_on.is_none() {
                    // Dropped from the queue by SessionClosed: it will never end on its own.
                    self.release_deps(task);
                    self.remove_record(task);
                    self.services.deferred.remove(&task);
                    // What waited for it (another session's call or task) learns it is gone.
                    for waiter in self.services.waiting_calls.remove(&task).unwrap_or_default() {
                        if self.tasks.get(&waiter).is_some_and(|r| r.outcome.is_none()) {
                            self.services.deferred.remove(&waiter);
                            self.fail_call_on_dependency(waiter, task);
                        }
                    }
                    continue;
                }
                if record.outcome.is_none() && matches!(record.kind, TaskKind::Function) {
                    // Nobody is left to want its result: stop it, and the tools it runs.
                    self.feed(Event::TaskCancelled { task, force: false });
                }
            }
            self.maybe_free(task);
        }
    }

    /// A message carrying `task`'s value could not be encoded (larger than a frame may be):
    /// its receiver learns that instead of waiting forever.
    pub(crate) fn value_not_sent(
        &mut self,
        session: SessionId,
        task: TaskId,
        sent: Result<(), chia_core::protocol::ProtocolError>,
    ) {
        let Err(e) = sent else { return };
        tracing::error!("could not send the value of {task} to {session}: {e}");
        let function = self.tasks.get(&task).map(|r| r.function.clone()).unwrap_or_default();
        let error = TaskError::BadResult { function, message: e.to_string() };
        self.outbox.send(session, &HeadToPeer::Done { task, done: Done::Failed(error) });
    }
}

/// The values of `task`'s arguments, borrowed where they are stored: nothing is copied
/// before encoding.
pub(crate) fn arg_values<'a>(
    tasks: &'a HashMap<TaskId, TaskRecord>,
    task: TaskId,
    args: &'a [Arg],
) -> Vec<ValueRef<'a>> {
    args.iter()
        .map(|arg| match arg {
            Arg::Value(value) => ValueRef(value),
            Arg::Ref(dep) => match tasks.get(dep).and_then(|r| r.outcome.as_ref()) {
                Some(Outcome::Value(value)) => ValueRef(value),
                _ => {
                    // Tasks are only sent once every argument succeeded.
                    tracing::error!("{task} was sent before its argument {dep} was ready");
                    ValueRef(&[])
                }
            },
        })
        .collect()
}

#[cfg(test)]
mod tests;

/// The host of a `host:port` peer address (an IPv6 host keeps its brackets); `None` for what
/// is not one (a replayed or simulated peer).
/// A worker may not offer what placement groups' bundles offer, nor labels that are not
/// well-formed (the types check them when parsed, but a peer's frame is decoded without).
fn check_offer(offer: &chia_core::protocol::WorkerOffer) -> Result<(), Rejection> {
    use chia_core::placement::{GROUP_PREFIX, Labels};
    if let Some((name, _)) = offer.resources.iter().find(|(name, _)| name.starts_with(GROUP_PREFIX)) {
        return Err(Rejection {
            reason: format!(
                "the worker offers the resource {name}, but names starting with {GROUP_PREFIX:?} belong to placement groups"
            ),
        });
    }
    let mut checked = Labels::new();
    for (key, value) in offer.labels.iter() {
        checked.insert(key, value).map_err(|e| Rejection { reason: format!("the worker's labels: {e}") })?;
    }
    Ok(())
}

fn host_of(remote: &str) -> Option<&str> {
    let (host, port) = remote.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    (!host.is_empty()).then_some(host)
}

/// One holder of `name` fewer.
fn release_name(names: &mut HashMap<String, usize>, name: &str) {
    if let Some(holders) = names.get_mut(name) {
        *holders -= 1;
        if *holders == 0 {
            names.remove(name);
        }
    }
}
