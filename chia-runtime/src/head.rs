//! The head: accepts authenticated QUIC connections, keeps the result objects, and drives the
//! I/O-free [`Scheduler`] with what peers send, carrying out the commands it returns.
//!
//! One `HeadCore` owns all state (scheduler, sessions, objects) behind one mutex. Connection
//! tasks decode frames without it and then apply each message under it; nothing inside awaits,
//! so the lock is held for microseconds, and a message costs no hand-off to another task.

mod persist;
mod services;

use crate::scheduler::{Command, Event, Scheduler, TaskStatus};
use crate::tls::{ClusterCredentials, HeadCredentials};
use crate::transport::{FrameReader, FrameSender};
use chia_core::protocol::{
    Arg, BypassSpec, Done, DoneRef, HeadToPeer, HeadToPeerRef, JobSettings, JobSettingsRef, Outcome,
    PROTOCOL_VERSION, PeerToHead, TaskSpec, ValueRef, WorkerOffer, decode_body,
};
use chia_core::{NodeId, SessionId, TaskError, TaskId};
use services::{Services, instance_function, ref_args};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Results up to this size travel with the `Done` notice; larger ones wait on the head until
/// the owner asks, so a ref that is only chained never crosses to the driver.
pub const INLINE_RESULT_BYTES: usize = 256 << 10;

/// How long a connected peer has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// The node name the head reserves for itself (services pinned with `node:head`).
pub const HEAD_NODE_NAME: &str = "head";

/// A running head.
pub struct HeadHandle {
    address: SocketAddr,
    endpoint: quinn::Endpoint,
    credentials: HeadCredentials,
    core: SharedCore,
    /// The head's own node, which hosts services pinned to `node:head`.
    head_node: Option<crate::worker::Worker>,
}

type SharedCore = Arc<Mutex<HeadCore>>;

fn lock(core: &SharedCore) -> MutexGuard<'_, HeadCore> {
    // The core does not panic on peer input; if a bug ever made it panic, keep serving the
    // state as it is rather than taking the whole head down.
    core.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the head holds right now (for tests, logs and the benchmark).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeadStats {
    pub sessions: usize,
    pub nodes: usize,
    /// Tasks the head keeps a record of: queued, running, or finished with a value someone
    /// can still ask for.
    pub tasks: usize,
    /// Bytes of finished results held.
    pub result_bytes: usize,
}

impl HeadHandle {
    /// The address the head listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The cluster file contents for peers that reach the head at `address`.
    pub fn cluster_credentials(&self, address: &str) -> ClusterCredentials {
        self.credentials.cluster(address)
    }

    /// A snapshot of what the head holds now.
    pub fn stats(&self) -> HeadStats {
        lock(&self.core).stats()
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        lock(&self.core).shutting_down = true;
        self.endpoint.close(0u32.into(), b"head shutting down");
    }

    /// Resolves when the head has stopped.
    pub async fn wait_stopped(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for HeadHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How a head detects failures and what it keeps across restarts.
#[derive(Clone, Debug)]
pub struct HeadOptions {
    /// How often workers send a heartbeat.
    pub heartbeat: Duration,
    /// A worker not heard from for this long (a frozen process, a cut network) is written off:
    /// nothing more is scheduled there, its tasks run again elsewhere, its connection is closed.
    pub heartbeat_timeout: Duration,
    /// Where the specifications of detached services are kept, so that a head restarted on the
    /// same directory starts them again (the cache with its entries). `None`: not kept.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
            state_dir: None,
        }
    }
}

/// Starts a head listening on `listen` with `credentials`, with its own node (`head`) joined.
pub async fn start_head(
    listen: SocketAddr,
    credentials: HeadCredentials,
) -> Result<HeadHandle, crate::Error> {
    start_head_with(listen, credentials, HeadOptions::default()).await
}

/// [`start_head`] with explicit [`HeadOptions`].
pub async fn start_head_with(
    listen: SocketAddr,
    credentials: HeadCredentials,
    options: HeadOptions,
) -> Result<HeadHandle, crate::Error> {
    let server = credentials.server_config().map_err(|e| crate::Error::Setup(e.to_string()))?;
    let endpoint = quinn::Endpoint::server(server, listen)
        .map_err(|e| crate::Error::Setup(format!("cannot listen on {listen}: {e}")))?;
    let address = endpoint.local_addr().map_err(|e| crate::Error::Setup(e.to_string()))?;
    if let Some(state_dir) = &options.state_dir {
        crate::bypass::protect_from_file_servers(state_dir);
    }
    let core = Arc::new(Mutex::new(HeadCore::new(options)));
    tokio::spawn(accept_loop(endpoint.clone(), core.clone()));
    tokio::spawn(expire_silent_nodes(Arc::downgrade(&core)));
    tracing::info!("head listening on {address}");
    let mut head = HeadHandle { address, endpoint, credentials, core, head_node: None };
    let mut loopback = address;
    if loopback.ip().is_unspecified() {
        loopback.set_ip(if address.is_ipv6() {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        });
    }
    let own = head.cluster_credentials(&loopback.to_string());
    head.head_node = Some(crate::worker::Worker::connect_head_node(&own).await?);
    lock(&head.core).restart_persisted_services();
    Ok(head)
}

/// Writes off workers that went silent, checking a few times per heartbeat timeout. Ends with
/// the head.
async fn expire_silent_nodes(core: std::sync::Weak<Mutex<HeadCore>>) {
    let Some(timeout) = core.upgrade().map(|core| lock(&core).options.heartbeat_timeout) else { return };
    let mut ticks = tokio::time::interval((timeout / 4).max(Duration::from_millis(10)));
    loop {
        ticks.tick().await;
        let Some(core) = core.upgrade() else { return };
        lock(&core).expire_silent_nodes(timeout);
    }
}

struct Hello {
    name: String,
    worker: Option<WorkerOffer>,
}

async fn accept_loop(endpoint: quinn::Endpoint, core: SharedCore) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, core.clone()));
    }
}

async fn serve_connection(incoming: quinn::Incoming, core: SharedCore) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(e) => {
            tracing::warn!("rejected a connection from {remote}: authentication failed ({e})");
            return;
        }
    };
    let (send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!("{remote} closed before opening its control stream: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("{remote} opened no control stream in {HELLO_TIMEOUT:?}; closing");
            connection.close(1u32.into(), b"no hello");
            return;
        }
    };
    let sender = FrameSender::spawn(send);
    let mut reader = FrameReader::new(recv);
    let reject = |reason: String| {
        tracing::warn!("rejected {remote}: {reason}");
        let _ = sender.send(&HeadToPeer::Rejected { reason });
        sender.close();
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next_frame()).await {
        Ok(Ok(Some(frame))) => decode_body::<PeerToHead>(frame),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return reject(format!("bad first frame: {e}")),
        Err(_) => return reject(format!("no hello within {HELLO_TIMEOUT:?}")),
    };
    let hello = match hello {
        Ok(PeerToHead::Hello { protocol_version, name, worker }) if protocol_version == PROTOCOL_VERSION => {
            Hello { name, worker }
        }
        Ok(PeerToHead::Hello { protocol_version, .. }) => {
            return reject(format!(
                "protocol version {protocol_version} is not supported; this head speaks version {PROTOCOL_VERSION}"
            ));
        }
        Ok(_) => return reject("the first message must be a hello".into()),
        Err(e) => return reject(format!("malformed hello: {e}")),
    };
    let session = lock(&core).join(hello, sender.clone(), connection.clone());
    let reason = loop {
        match reader.next_frame().await {
            Ok(Some(frame)) => match decode_body::<PeerToHead>(frame) {
                Ok(message) => lock(&core).message(session, message),
                Err(e) => break format!("malformed message: {e}"),
            },
            Ok(None) => break "closed by the peer".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    connection.close(2u32.into(), reason.as_bytes());
    lock(&core).close(session, &reason);
}

struct Session {
    name: String,
    node: Option<NodeId>,
    sender: FrameSender,
    connection: quinn::Connection,
    /// Bytes received on the connection when the expiry timer last looked: a node in the
    /// middle of sending a large frame is alive although no whole frame arrived for a while.
    received: u64,
}

/// A submitted task and, once it ends, its result.
struct TaskRecord {
    owner: SessionId,
    function: String,
    tag: Option<String>,
    /// The arguments (refs are resolved at each dispatch), kept until the task ends: if its
    /// node is lost, it is sent again.
    args: Vec<Arg>,
    deps: Vec<TaskId>,
    /// The job whose settings the task is sent with: its owner's, or for a nested call its
    /// driver's.
    job: SessionId,
    /// What replaces the function, when the caller bypassed the call (boxed: most are not).
    bypass: Option<Box<BypassSpec>>,
    running_on: Option<NodeId>,
    outcome: Option<Outcome>,
    /// The owner still holds an `ObjectRef` to it.
    owner_holds: bool,
    /// Submitted tasks that take this one as an argument and have not ended yet.
    dependents: u32,
    kind: TaskKind,
}

impl TaskRecord {
    /// A record of a request `owner` made, not placed yet, held by its owner, taking `args`
    /// (whose refs are `deps`); part of the owner's own job, not bypassed.
    fn new(
        owner: SessionId,
        function: String,
        args: Vec<Arg>,
        deps: Vec<TaskId>,
        kind: TaskKind,
    ) -> TaskRecord {
        TaskRecord {
            owner,
            function,
            tag: None,
            args,
            deps,
            job: owner,
            bypass: None,
            running_on: None,
            outcome: None,
            owner_holds: true,
            dependents: 0,
            kind,
        }
    }
}

/// What a task record stands for.
enum TaskKind {
    /// A function call, placed by the scheduler.
    Function,
    /// The placement of a service instance; it runs (holding its resources) until the service
    /// stops.
    ServiceStart(chia_core::ServiceId),
    /// A method call, sent to the instance's node once `missing` arguments are ready.
    ServiceCall { service: chia_core::ServiceId, name: String, method: String, missing: usize },
}

struct HeadCore {
    scheduler: Scheduler,
    sessions: HashMap<SessionId, Session>,
    nodes: HashMap<NodeId, SessionId>,
    tasks: HashMap<TaskId, TaskRecord>,
    next_session: u64,
    next_node: u64,
    last_infeasible: Option<String>,
    services: Services,
    /// Settings of jobs (by driver session) that their tasks carry.
    jobs: HashMap<SessionId, JobSettings>,
    /// The head is closing every connection: what ends now ends on purpose, not by failure.
    shutting_down: bool,
    options: HeadOptions,
    /// Detached services to start again after a restart (with a state directory).
    persisted: Option<persist::ServiceStore>,
}

impl HeadCore {
    fn new(options: HeadOptions) -> HeadCore {
        HeadCore {
            persisted: options.state_dir.as_deref().map(persist::ServiceStore::open),
            options,
            scheduler: Scheduler::new(),
            sessions: HashMap::new(),
            nodes: HashMap::new(),
            tasks: HashMap::new(),
            next_session: 1,
            next_node: 1,
            last_infeasible: None,
            services: Services::default(),
            jobs: HashMap::new(),
            shutting_down: false,
        }
    }

    fn stats(&self) -> HeadStats {
        let result_bytes = self
            .tasks
            .values()
            .map(|r| match &r.outcome {
                Some(Outcome::Value(value)) => value.len(),
                _ => 0,
            })
            .sum();
        HeadStats {
            sessions: self.sessions.len(),
            nodes: self.nodes.len(),
            tasks: self.tasks.len(),
            result_bytes,
        }
    }

    fn expire_silent_nodes(&mut self, timeout: Duration) {
        let now = Instant::now();
        for session in self.sessions.values_mut() {
            let Some(node) = session.node else { continue };
            let received = session.connection.stats().udp_rx.bytes;
            // The head's own node lives and dies with this process: it is never written off.
            let in_process = session.name == HEAD_NODE_NAME;
            if received != session.received || in_process {
                session.received = received;
                self.scheduler.handle(now, Event::NodeHeard { node });
            }
        }
        self.scheduler.expire_silent(now, timeout);
        self.run_commands();
    }

    fn feed(&mut self, event: Event) {
        self.scheduler.handle(Instant::now(), event);
        self.run_commands();
    }

    /// Carries out what the scheduler decided, in order.
    fn run_commands(&mut self) {
        let commands: Vec<Command> = self.scheduler.drain_commands().collect();
        for command in commands {
            self.execute(command);
        }
    }

    fn join(&mut self, hello: Hello, sender: FrameSender, connection: quinn::Connection) -> SessionId {
        let session = SessionId(self.next_session);
        self.next_session += 1;
        let (node, name) = match &hello.worker {
            Some(_) => {
                let node = NodeId(self.next_node);
                self.next_node += 1;
                let head_node = hello.worker.as_ref().is_some_and(|offer| offer.head_node);
                let name = if head_node && !self.sessions.values().any(|s| s.name == HEAD_NODE_NAME) {
                    HEAD_NODE_NAME.to_string()
                } else {
                    self.unique_node_name(&hello.name)
                };
                (Some(node), name)
            }
            None => (None, format!("driver-{}", session.0)),
        };
        let welcome = HeadToPeer::Welcome {
            protocol_version: PROTOCOL_VERSION,
            session,
            node,
            node_name: name.clone(),
            heartbeat_ms: if node.is_some() { self.options.heartbeat.as_millis() as u64 } else { 0 },
        };
        if let Err(e) = sender.send(&welcome) {
            tracing::error!("could not welcome {name}: {e}");
        }
        tracing::info!(
            "{name} joined from {} as {session}{}",
            connection.remote_address(),
            match &hello.worker {
                Some(offer) => format!(
                    " with {}, {} function(s) and {} service type(s)",
                    offer.resources,
                    offer.functions.len(),
                    offer.services.len()
                ),
                None => String::new(),
            }
        );
        let received = connection.stats().udp_rx.bytes;
        self.sessions.insert(session, Session { name: name.clone(), node, sender, connection, received });
        if let (Some(node), Some(offer)) = (node, hello.worker) {
            self.nodes.insert(node, session);
            let mut functions = offer.functions;
            functions.extend(offer.services.iter().map(instance_function));
            self.feed(Event::NodeJoined { node, name, resources: offer.resources, functions });
        }
        session
    }

    fn unique_node_name(&self, wanted: &str) -> String {
        let taken: HashSet<&str> = self.sessions.values().map(|s| s.name.as_str()).collect();
        let base = if wanted.is_empty() || wanted == HEAD_NODE_NAME { "worker" } else { wanted };
        if !taken.contains(base) {
            return base.to_string();
        }
        (2..)
            .map(|n| format!("{base}-{n}"))
            .find(|name| !taken.contains(name.as_str()))
            .expect("names run out")
    }

    fn message(&mut self, session: SessionId, message: PeerToHead) {
        let Some(peer) = self.sessions.get(&session) else {
            // Closed (written off) between the frame's decoding and now: nothing it says counts.
            return;
        };
        if let Some(node) = peer.node {
            // Any frame shows the node is alive; heartbeats only fill the silences.
            self.scheduler.handle(Instant::now(), Event::NodeHeard { node });
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
                self.send_value(session, task, &HeadToPeerRef::Fetched { task, outcome });
            }
            PeerToHead::Finished { task, outcome } => self.finished(session, task, outcome),
            PeerToHead::Blocked { task } => {
                if self.runs_on_session(task, session) {
                    self.feed(Event::TaskBlocked { task });
                }
            }
            PeerToHead::Ping { nonce } => self.send(session, &HeadToPeer::Pong { nonce }),
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
                if self
                    .tasks
                    .get(&task)
                    .is_some_and(|r| r.owner == session && matches!(r.kind, TaskKind::Function))
                {
                    self.feed(Event::TaskCancelled { task, force });
                }
            }
            PeerToHead::Heartbeat => {}
            PeerToHead::Hello { .. } => tracing::warn!("{session} sent a second hello; ignored"),
        }
    }

    fn runs_on_session(&self, task: TaskId, session: SessionId) -> bool {
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
            bypass: spec.bypass.map(Box::new),
            ..TaskRecord::new(
                session,
                spec.function.name.clone(),
                spec.args,
                deps.clone(),
                TaskKind::Function,
            )
        };
        self.tasks.insert(task, record);
        self.feed(Event::TaskSubmitted {
            task,
            function: spec.function,
            request: spec.request,
            deps,
            max_retries: spec.max_retries,
            // Not in the protocol yet: application errors are final.
            retry_exceptions: spec.retry_exceptions,
        });
    }

    /// Keeps the values of `deps` until the task that takes them ends: it may be sent again.
    fn hold_deps(&mut self, deps: &[TaskId]) {
        for dep in deps {
            if let Some(record) = self.tasks.get_mut(dep) {
                record.dependents += 1;
            }
        }
    }

    fn finished(&mut self, session: SessionId, task: TaskId, outcome: Outcome) {
        if !self.runs_on_session(task, session) {
            tracing::warn!("{session} reported {task}, which it is not running; ignored");
            return;
        }
        let Some(record) = self.tasks.get_mut(&task) else { return };
        let Some(node) = record.running_on else { return };
        match record.kind {
            TaskKind::ServiceStart(service) => self.instance_started(task, service, outcome),
            TaskKind::ServiceCall { .. } => {
                record.running_on = None;
                self.settle(task, outcome);
            }
            TaskKind::Function => {
                record.running_on = None;
                let cancelled = self.scheduler.is_cancelled(task);
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
                            tracing::debug!("{task} failed on {node} and is queued again: {error}");
                        } else if !settled {
                            self.settle(task, Outcome::Failed(error));
                        }
                    }
                }
            }
        }
    }

    /// Stores a task's outcome and tells its owner.
    fn settle(&mut self, task: TaskId, outcome: Outcome) {
        let Some(record) = self.tasks.get_mut(&task) else { return };
        if let (services::HEAD_SESSION, Outcome::Failed(error)) = (record.owner, &outcome) {
            tracing::warn!("{} failed: {error}", record.function);
        }
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
    fn announce(&self, task: TaskId) {
        let Some(record) = self.tasks.get(&task) else { return };
        let Some(outcome) = record.outcome.as_ref().filter(|_| record.owner_holds) else { return };
        let done = match outcome {
            Outcome::Value(value) if value.len() <= INLINE_RESULT_BYTES => DoneRef::Value(ValueRef(value)),
            Outcome::Value(value) => DoneRef::Stored { len: value.len() as u64 },
            Outcome::Failed(error) => DoneRef::Failed(error),
        };
        self.send_value(record.owner, task, &HeadToPeerRef::Done { task, done });
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Dispatch { task, node, attempt } => self.dispatch(task, node, attempt),
            Command::Fail { task, error } => {
                tracing::debug!("{task} failed: {error}");
                self.release_deps(task);
                match self.tasks.get(&task).map(|r| &r.kind) {
                    Some(TaskKind::ServiceStart(service)) => self.instance_task_failed(task, *service, error),
                    _ => self.settle(task, Outcome::Failed(error)),
                }
            }
            Command::Infeasible { task, reason } => {
                // Many tasks of one shape share a reason: say it once, not once per task.
                if self.last_infeasible.as_deref() != Some(reason.as_str()) {
                    tracing::warn!("{task} (and others like it) cannot run on any node now: {reason}");
                    self.last_infeasible = Some(reason.clone());
                }
                if let Some((owner, kind)) = self.tasks.get(&task).map(|r| (r.owner, &r.kind)) {
                    if let TaskKind::ServiceStart(service) = *kind {
                        self.instance_unplaceable(service, &reason);
                    }
                    self.send(owner, &HeadToPeer::Infeasible { task, reason });
                }
            }
            Command::Cancel { task, node, force } => {
                // It ends when its node reports it; the scheduler records it as cancelled then.
                if let Some(&session) = self.nodes.get(&node) {
                    self.send(session, &HeadToPeer::Cancel { task, force });
                }
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
            return;
        };
        if let TaskKind::ServiceStart(service) = record.kind {
            return self.dispatch_instance(task, service, node, session);
        }
        if attempt > 1 {
            tracing::debug!("{task} ({}) runs again, on {node} (attempt {attempt})", record.function);
        }
        record.running_on = Some(node);
        let Some(record) = self.tasks.get(&task) else { return };
        let values = self.arg_values(task, &record.args);
        let job = self.jobs.get(&record.job).map(|job| JobSettingsRef {
            job: job.job,
            revision: job.revision,
            settings: ValueRef(&job.settings),
        });
        let execute = HeadToPeerRef::Execute {
            task,
            function: &record.function,
            args: values,
            tag: record.tag.as_deref(),
            bypass: record.bypass.as_deref(),
            job,
        };
        let sent = self.sessions.get(&session).map(|peer| peer.sender.send(&execute));
        let name = record.function.clone();
        let Some(Err(e)) = sent else { return };
        // The arguments together exceed what a frame may carry: the task can never be sent.
        let error =
            TaskError::InvalidCall { function: name, message: format!("its arguments cannot be sent: {e}") };
        if let Some(record) = self.tasks.get_mut(&task) {
            record.running_on = None;
        }
        self.feed(Event::TaskFinished { task, node, error: Some(error.clone()) });
        self.settle(task, Outcome::Failed(error));
    }

    /// The values of `task`'s arguments, borrowed where they are stored: nothing is copied
    /// before encoding.
    fn arg_values<'a>(&'a self, task: TaskId, args: &'a [Arg]) -> Vec<ValueRef<'a>> {
        args.iter()
            .map(|arg| match arg {
                Arg::Value(value) => ValueRef(value),
                Arg::Ref(dep) => match self.tasks.get(dep).and_then(|r| r.outcome.as_ref()) {
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

    /// The task no longer needs its dependencies' values.
    fn release_deps(&mut self, task: TaskId) {
        let deps = self.tasks.get_mut(&task).map(|r| std::mem::take(&mut r.deps)).unwrap_or_default();
        for dep in deps {
            if let Some(record) = self.tasks.get_mut(&dep) {
                record.dependents = record.dependents.saturating_sub(1);
                self.maybe_free(dep);
            }
        }
    }

    /// Frees a finished task's record once nobody can ask for its value any more.
    fn maybe_free(&mut self, task: TaskId) {
        let Some(record) = self.tasks.get(&task) else { return };
        if record.owner_holds
            || record.dependents > 0
            || record.outcome.is_none()
            || self.services.announce_waits(task)
        {
            return;
        }
        self.tasks.remove(&task);
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

    fn close(&mut self, session: SessionId, reason: &str) {
        let Some(closed) = self.sessions.remove(&session) else { return };
        self.jobs.remove(&session);
        tracing::info!("{} ({session}) left: {reason}", closed.name);
        closed.sender.close();
        closed.connection.close(0u32.into(), b"closed");
        self.stop_services_of(session);
        if let Some(node) = closed.node {
            self.fail_calls_on(node, &closed.name);
            // The scheduler runs its tasks again or fails them; until one is sent again it runs
            // nowhere (so its owner leaving drops it).
            for record in self.tasks.values_mut() {
                if record.running_on == Some(node) && matches!(record.kind, TaskKind::Function) {
                    record.running_on = None;
                }
            }
            self.nodes.remove(&node);
            self.feed(Event::NodeLost { node });
        }
        self.feed(Event::SessionClosed { session });
        let owned: Vec<TaskId> =
            self.tasks.iter().filter(|(_, r)| r.owner == session).map(|(t, _)| *t).collect();
        for task in owned {
            if let Some(record) = self.tasks.get_mut(&task) {
                record.owner_holds = false;
                if record.outcome.is_none() && record.running_on.is_none() {
                    // Dropped from the queue by SessionClosed: it will never end on its own.
                    self.release_deps(task);
                    self.tasks.remove(&task);
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

    fn send(&self, session: SessionId, message: &HeadToPeer) {
        let Some(peer) = self.sessions.get(&session) else { return };
        if let Err(e) = peer.sender.send(message) {
            tracing::error!("could not send to {}: {e}", peer.name);
        }
    }

    /// Sends a message carrying `task`'s value; if it cannot be encoded, the owner learns
    /// that instead of waiting forever.
    fn send_value(&self, session: SessionId, task: TaskId, message: &HeadToPeerRef<'_>) {
        let Some(peer) = self.sessions.get(&session) else { return };
        if let Err(e) = peer.sender.send(message) {
            tracing::error!("could not send the value of {task} to {}: {e}", peer.name);
            let function = self.tasks.get(&task).map(|r| r.function.clone()).unwrap_or_default();
            let error = TaskError::BadResult { function, message: e.to_string() };
            let _ = peer.sender.send(&HeadToPeer::Done { task, done: Done::Failed(error) });
        }
    }
}
