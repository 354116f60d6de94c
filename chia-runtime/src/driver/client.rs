//! One connection to the head, as used by a driver and by a worker's nested calls.
//!
//! The client keeps a slot per task it submitted: pending, a value, a value still on the head
//! (large results are fetched on demand), or an error. `get` and `wait` park on a slot's
//! waiters; the reader task fills slots as `Done`/`Fetched` frames arrive.
//!
//! When the head keeps a journal (its welcome names it), the client survives the head's
//! restart: it keeps every state-changing frame until the head says it is durable
//! (`Durable`), and when the connection is lost it dials the head again until the head's grace
//! period ends, takes up its session (`Resume`: the tasks it runs as a worker, the outcomes it
//! still waits for), and sends again what the head did not keep. Pending `get`s just wait.

use crate::driver::figures::ServiceFigures;
use crate::error::{Error, JoinError};
use crate::net::tls::{ClusterCredentials, HEAD_SERVER_NAME};
use crate::net::transport::{FrameReader, FrameSender, TransportError};
use chia_core::protocol::{
    ArgValue, BypassSpec, CloseCode, Done, HeadToPeer, JobSettings, Outcome, PROTOCOL_VERSION, PeerToHead,
    ResumeSession, TaskAttempt, UnansweredStart, Value, WorkerFigures, WorkerOffer, decode_body,
    encode_frame,
};
use chia_core::{NodeId, ServiceId, SessionId, TaskError, TaskId};
use chia_head_core::journal::changes_state;
use dashmap::DashMap;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Work the head asks this process (a worker) to do.
#[derive(Debug)]
pub enum Execution {
    /// Run a function, or what replaces it when `bypass` is set; `job` carries the settings
    /// of the job the task belongs to.
    Task {
        task: TaskId,
        /// Which run of the task this is; reported back with its outcome.
        attempt: u32,
        function: String,
        args: Vec<ArgValue>,
        tag: Option<String>,
        bypass: Option<BypassSpec>,
        job: Option<JobSettings>,
        /// How long the run may take from when the worker starts it.
        timeout: Option<Duration>,
    },
    /// Construct a service instance.
    StartInstance { task: TaskId, service: ServiceId, type_name: String, args: Vec<ArgValue> },
    /// Call a method of an instance held here.
    CallInstance { task: TaskId, service: ServiceId, method: String, args: Vec<ArgValue> },
    /// Drop an instance.
    StopInstance { service: ServiceId },
    /// Cancel a running task.
    Cancel { task: TaskId, force: bool },
}

/// Every how many heartbeats a worker sends its figures ([`PeerToHead::Figures`]) instead:
/// often enough for a scrape every few seconds, rare enough that measuring costs nothing.
const FIGURES_EVERY: u32 = 5;

/// What a worker measures of itself for its heartbeats ([`Client::set_figures_source`]).
pub type FiguresSource = dyn Fn() -> WorkerFigures + Send + Sync;

/// Tells the head this worker is alive, as often as it asked, until the connection ends. A
/// frozen process (SIGSTOP, a stalled machine) stops sending, which is how the head notices.
/// Once the worker gave a figures source, the first beat after it and every
/// [`FIGURES_EVERY`]th carry its figures.
async fn send_heartbeats(client: std::sync::Weak<Client>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Beats since figures were last sent; `None` before the first were.
    let mut since_figures: Option<u32> = None;
    loop {
        ticks.tick().await;
        let Some(client) = client.upgrade() else { return };
        let source = client.figures_source.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let message = match source {
            Some(source) if since_figures.is_none_or(|beats| beats + 1 >= FIGURES_EVERY) => {
                since_figures = Some(0);
                PeerToHead::Figures(source())
            }
            _ => {
                since_figures = since_figures.map(|beats| beats + 1);
                PeerToHead::Heartbeat
            }
        };
        if client.is_closed() || client.send(&message).is_err() {
            return;
        }
    }
}

#[derive(Clone)]
pub(crate) enum SlotState {
    Pending,
    /// The value is on the head; `fetching` once a Fetch was sent.
    Stored {
        fetching: bool,
    },
    Value(Arc<Value>),
    Failed(Error),
}

struct Slot {
    state: SlotState,
    infeasible: Option<String>,
    waiters: Vec<Arc<Notify>>,
    /// A request the head answers at once from what it holds (a lookup, a stop), sent again
    /// after the head restarted if it is still unanswered: the answer may have died with it.
    /// (Starts, which it may answer at once too, are in `Link::starts`.)
    again: Option<Box<PeerToHead>>,
}

/// A driver's or a worker's connection to the head, and the session the head keeps for it:
/// submits calls and requests, holds their results until they are asked for, and (for a
/// worker) passes on the `Execution`s the head sends. Shared as an `Arc` by every
/// [`Context`](crate::Context) made on it.
pub struct Client {
    session: SessionId,
    node: Option<NodeId>,
    node_name: String,
    next_seq: AtomicU64,
    link: Mutex<Link>,
    /// Set when the head keeps a journal: the session can be taken up after a head restart.
    resume: Option<Resumable>,
    /// This side is shutting down: a lost connection is not dialled again.
    leaving: AtomicBool,
    peer: SocketAddr,
    slots: DashMap<TaskId, Slot>,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    /// The head closed the connection because a worker of the same name joined from the same
    /// host ([`CloseCode::Replaced`]): this one must not join again.
    replaced: AtomicBool,
    pings: DashMap<u64, tokio::sync::oneshot::Sender<()>>,
    next_ping: AtomicU64,
    endpoint: quinn::Endpoint,
    runtime: tokio::runtime::Handle,
    /// What the worker on this connection measures of itself, for its heartbeats.
    figures_source: Mutex<Option<Arc<FiguresSource>>>,
    /// The figure sources of the service instances this connection's worker hosts.
    service_figures: Arc<ServiceFigures>,
}

/// The connection the session runs on now, and what it must be able to send again.
struct Link {
    sender: FrameSender,
    connection: quinn::Connection,
    /// False while the head is being dialled again: frames that change state wait in
    /// `unacked` unnumbered, the others are dropped (the head would not count them).
    up: bool,
    /// Frames sent on the session; the head counts the same, which numbers its `Durable`.
    sent: u64,
    /// State-changing frames the head has not said are durable, oldest first.
    unacked: VecDeque<Unacked>,
    /// Runs of tasks the head gave this worker whose outcome it has not made durable yet.
    leases: HashSet<TaskAttempt>,
    /// Service starts not answered yet, with the number of their frame (0 while it waits for
    /// the head to come back): the `Resume` lists them (`ResumeSession::starts`).
    starts: HashMap<TaskId, UnansweredStart>,
}

struct Unacked {
    /// Its number on the session; 0 while it waits for the head to come back.
    seq: u64,
    frame: Vec<u8>,
    /// The run whose outcome it reports, for a `Finished`.
    finished: Option<TaskAttempt>,
    /// The request it makes, for one that is also asked again while unanswered
    /// (`Slot::again`): sent again with the unacknowledged frames, it is not asked twice.
    request: Option<TaskId>,
    /// The service start it carries (its number is kept in `Link::starts` too).
    start: Option<TaskId>,
}

/// What taking the session up again needs.
struct Resumable {
    journal_id: u64,
    /// How long the head waits for us after a restart.
    grace: Duration,
}

impl Link {
    fn new(sender: FrameSender, connection: quinn::Connection) -> Link {
        Link {
            sender,
            connection,
            up: true,
            sent: 0,
            unacked: VecDeque::new(),
            leases: HashSet::new(),
            starts: HashMap::new(),
        }
    }

    /// The head keeps the session's frames up to `through`.
    fn durable(&mut self, through: u64) {
        while self.unacked.front().is_some_and(|u| u.seq != 0 && u.seq <= through) {
            if let Some(Unacked { finished: Some(lease), .. }) = self.unacked.pop_front() {
                self.leases.remove(&lease);
            }
        }
    }

    /// A new connection to the restarted head, which has the session's frames up to
    /// `through`: everything after is sent again, numbered from there. Returns the requests
    /// among them.
    fn resumed(
        &mut self,
        sender: FrameSender,
        connection: quinn::Connection,
        through: u64,
    ) -> HashSet<TaskId> {
        self.durable(through);
        self.sender = sender;
        self.connection = connection;
        self.sent = through;
        let mut requests = HashSet::new();
        for unacked in &mut self.unacked {
            self.sent += 1;
            unacked.seq = self.sent;
            self.sender.send_frame(unacked.frame.clone());
            requests.extend(unacked.request);
            if let Some(start) = unacked.start.and_then(|task| self.starts.get_mut(&task)) {
                start.frame = unacked.seq;
            }
        }
        self.up = true;
        requests
    }
}

/// How long a peer waits for the head's answer to its Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// Connects to the head, authenticates, and says hello. A worker passes its offer and
    /// gets back the channel of executions the head sends it.
    pub async fn connect(
        credentials: &ClusterCredentials,
        name: &str,
        offer: Option<WorkerOffer>,
    ) -> Result<(Arc<Client>, mpsc::UnboundedReceiver<Execution>), Error> {
        let address = credentials.address.clone();
        let join = |cause: JoinError| Error::Join { address: address.clone(), cause };
        let peer: SocketAddr = tokio::net::lookup_host(&address)
            .await
            .map_err(|e| join(JoinError::Resolve(Arc::new(e))))?
            .next()
            .ok_or_else(|| join(JoinError::NoAddress))?;
        let bind = if peer.is_ipv6() {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| join(JoinError::Endpoint(Arc::new(e))))?;
        endpoint.set_default_client_config(
            credentials.client_config().map_err(|e| join(JoinError::Credentials(Arc::new(e))))?,
        );
        // A certificate refused either way is said in words (another cluster's file, a revoked
        // member) rather than as the check rustls names; the head refusing ours may only show
        // once our side of the handshake is done, at the first stream or the first answer.
        let refused = |error: &quinn::ConnectionError| {
            crate::net::tls::explain_connection_error(error, credentials)
                .map(|explanation| JoinError::Certificate { explanation, cause: error.clone() })
        };
        let broken = |connection: &quinn::Connection, otherwise: JoinError| {
            join(connection.close_reason().and_then(|e| refused(&e)).unwrap_or(otherwise))
        };
        let connection = endpoint
            .connect(peer, HEAD_SERVER_NAME)
            .map_err(|e| join(JoinError::Connect(e)))?
            .await
            .map_err(|e| join(refused(&e).unwrap_or(JoinError::Handshake(e))))?;
        let (send, recv) =
            connection.open_bi().await.map_err(|e| broken(&connection, JoinError::Handshake(e)))?;
        let sender = FrameSender::spawn(send);
        sender
            .send(&PeerToHead::Hello {
                protocol_version: PROTOCOL_VERSION,
                name: name.to_string(),
                worker: offer,
            })
            .map_err(|e| Error::Send { what: "the hello", cause: Arc::new(e) })?;
        let mut reader = FrameReader::new(recv);
        let (session, node, node_name, heartbeat_ms, resume) =
            match first_answer(&mut reader).await.map_err(|error| broken(&connection, error))? {
                HeadToPeer::Welcome {
                    session,
                    node,
                    node_name,
                    heartbeat_ms,
                    journal_id,
                    resume_grace_ms,
                    ..
                } => {
                    let resume = journal_id.map(|journal_id| Resumable {
                        journal_id,
                        grace: Duration::from_millis(resume_grace_ms),
                    });
                    (session, node, node_name, heartbeat_ms, resume)
                }
                HeadToPeer::Rejected { reason } => return Err(join(JoinError::Rejected { reason })),
                other => return Err(join(JoinError::Protocol(format!("{other:?}")))),
            };
        let client = Arc::new(Client {
            session,
            node,
            node_name,
            next_seq: AtomicU64::new(1),
            link: Mutex::new(Link::new(sender, connection)),
            resume,
            leaving: AtomicBool::new(false),
            peer,
            slots: DashMap::new(),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            replaced: AtomicBool::new(false),
            pings: DashMap::new(),
            next_ping: AtomicU64::new(1),
            endpoint,
            runtime: tokio::runtime::Handle::current(),
            figures_source: Mutex::new(None),
            service_figures: Arc::default(),
        });
        if heartbeat_ms > 0 {
            tokio::spawn(send_heartbeats(Arc::downgrade(&client), Duration::from_millis(heartbeat_ms)));
        }
        let (executions, execution_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(client.clone(), reader, executions));
        Ok((client, execution_rx))
    }

    /// [`Client::connect`], trying again for up to `patience` while the head cannot be
    /// reached (it is starting, or restarting): a driver started while its head is away joins
    /// once it is back. A head that answers and refuses is an error at once.
    pub async fn connect_patiently(
        credentials: &ClusterCredentials,
        name: &str,
        offer: Option<WorkerOffer>,
        patience: Duration,
    ) -> Result<(Arc<Client>, mpsc::UnboundedReceiver<Execution>), Error> {
        let deadline = std::time::Instant::now() + patience;
        let backoff = crate::util::Backoff::default();
        for attempt in 0.. {
            match Client::connect(credentials, name, offer.clone()).await {
                Err(Error::Join { address, cause }) if cause.is_retryable() => {
                    let wait = backoff.delay(attempt);
                    if std::time::Instant::now() + wait >= deadline {
                        let cause = JoinError::GaveUp { waited: patience, last: Box::new(cause) };
                        return Err(Error::Join { address, cause });
                    }
                    if attempt == 0 {
                        tracing::warn!(
                            "could not join the cluster at {address}: {cause}; trying again for up to {patience:?}"
                        );
                    }
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
        unreachable!("the attempts above never run out")
    }

    /// The session the head gave this client when it joined; it stays the same when the
    /// client takes it up again after a head restart. The tasks it submits are numbered in it.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The node this client's worker runs as (`None` for a driver).
    pub fn node(&self) -> Option<NodeId> {
        self.node
    }

    /// The name the head gave this process (the node name for a worker).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Gives the heartbeats what to measure: a worker's heartbeats carry its figures from now
    /// on (see [`PeerToHead::Figures`]); replaces any earlier source. The source runs on the
    /// heartbeat task, so it must be cheap.
    pub fn set_figures_source(&self, source: Box<FiguresSource>) {
        *self.figures_source.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::from(source));
    }

    /// The figure sources of the service instances hosted on this connection's worker.
    pub fn service_figures(&self) -> &Arc<ServiceFigures> {
        &self.service_figures
    }

    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    pub(crate) fn next_task_id(&self) -> TaskId {
        TaskId::new(self.session, self.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a submission and opens its slot.
    /// Opens a pending slot for `task` and sends `message`, which the head answers with
    /// `Done { task }` (a submission, a service start, lookup, call or stop).
    pub(crate) fn request(&self, task: TaskId, function: &str, message: &PeerToHead) {
        let again = message.repeatable_request().map(|_| Box::new(message.clone()));
        self.slots
            .insert(task, Slot { state: SlotState::Pending, infeasible: None, waiters: Vec::new(), again });
        if self.closed.load(Ordering::Acquire) {
            self.finish_slot(task, SlotState::Failed(self.disconnected()));
            return;
        }
        if let Err(e) = self.send(message) {
            let error = TaskError::InvalidCall { function: function.to_string(), message: e.to_string() };
            self.finish_slot(task, SlotState::Failed(error.into()));
        }
    }

    /// Opens a slot that is already failed (a call rejected before sending).
    pub(crate) fn fail_locally(&self, task: TaskId, error: TaskError) {
        self.slots.insert(
            task,
            Slot {
                state: SlotState::Failed(error.into()),
                infeasible: None,
                waiters: Vec::new(),
                again: None,
            },
        );
    }

    /// Every `ObjectRef` to `task` is gone.
    pub(crate) fn release(&self, task: TaskId) {
        if self.slots.remove(&task).is_some() && !self.closed.load(Ordering::Acquire) {
            let _ = self.send(&PeerToHead::Release { tasks: vec![task] });
        }
    }

    pub(crate) fn send(&self, message: &PeerToHead) -> Result<(), chia_core::protocol::ProtocolError> {
        // Encode outside the lock, so a large message does not hold up other senders.
        let mut frame = Vec::with_capacity(256);
        encode_frame(message, &mut frame)?;
        let mut link = lock(&self.link);
        let keep = self.resume.is_some() && changes_state(message);
        let unacked = |seq, frame| Unacked {
            seq,
            frame,
            finished: finished_run(message),
            request: message.repeatable_request(),
            start: match message {
                PeerToHead::StartService(start) => Some(start.task),
                _ => None,
            },
        };
        if let (true, PeerToHead::StartService(start)) = (keep, message) {
            let frame = if link.up { link.sent + 1 } else { 0 };
            link.starts.insert(start.task, UnansweredStart { frame, start: start.clone() });
        }
        if !link.up {
            if keep {
                link.unacked.push_back(unacked(0, frame));
            }
            return Ok(());
        }
        link.sent += 1;
        if keep {
            let seq = link.sent;
            link.unacked.push_back(unacked(seq, frame.clone()));
        }
        link.sender.send_frame(frame);
        Ok(())
    }

    /// The head gave this worker a run of a task: it is known until its outcome is durable.
    fn leased(&self, lease: TaskAttempt) {
        if self.resume.is_some() {
            lock(&self.link).leases.insert(lease);
        }
    }

    /// Registers `waiter` on `task` unless it is already settled; returns the state seen.
    /// A `Stored` value triggers its fetch here, once.
    pub(crate) fn poll_slot(
        &self,
        task: TaskId,
        waiter: &Arc<Notify>,
        fetch: bool,
    ) -> (SlotState, Option<String>) {
        let Some(mut slot) = self.slots.get_mut(&task) else {
            return (
                SlotState::Failed(Error::Disconnected(format!("{task} is not known to this client"))),
                None,
            );
        };
        if fetch && matches!(slot.state, SlotState::Stored { fetching: false }) {
            slot.state = SlotState::Stored { fetching: true };
            let _ = self.send(&PeerToHead::Fetch { task });
        }
        let waiting = match slot.state {
            SlotState::Pending => true,
            SlotState::Stored { .. } => fetch,
            SlotState::Value(_) | SlotState::Failed(_) => false,
        };
        if waiting && !slot.waiters.iter().any(|w| Arc::ptr_eq(w, waiter)) {
            slot.waiters.push(waiter.clone());
        }
        (slot.state.clone(), slot.infeasible.clone())
    }

    fn finish_slot(&self, task: TaskId, state: SlotState) {
        if let Some(mut slot) = self.slots.get_mut(&task) {
            slot.state = state;
            for waiter in slot.waiters.drain(..) {
                waiter.notify_one();
            }
        }
    }

    fn disconnected(&self) -> Error {
        let reason = self.close_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Error::Disconnected(reason.unwrap_or_else(|| "the connection is closed".into()))
    }

    /// Marks the client closed and fails every unsettled slot.
    fn mark_closed(&self, reason: String) {
        *self.close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.closed.store(true, Ordering::Release);
        let error = self.disconnected();
        self.pings.clear();
        for mut slot in self.slots.iter_mut() {
            if matches!(slot.state, SlotState::Pending | SlotState::Stored { .. }) {
                slot.state = SlotState::Failed(error.clone());
                for waiter in slot.waiters.drain(..) {
                    waiter.notify_one();
                }
            }
        }
    }

    /// One round trip to the head; fails if the connection is gone.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let nonce = self.next_ping.fetch_add(1, Ordering::Relaxed);
        let (pong, answered) = tokio::sync::oneshot::channel();
        self.pings.insert(nonce, pong);
        let started = std::time::Instant::now();
        if self.closed.load(Ordering::Acquire) || self.send(&PeerToHead::Ping { nonce }).is_err() {
            self.pings.remove(&nonce);
            return Err(self.disconnected());
        }
        // The sender is dropped when the connection closes, which ends the wait.
        answered.await.map_err(|_| self.disconnected())?;
        Ok(started.elapsed())
    }

    /// The head closed this session because a worker of the same name joined from the same
    /// host: this process is taken to be the predecessor, and must not join again.
    pub fn was_replaced(&self) -> bool {
        self.replaced.load(Ordering::Acquire)
    }

    /// Whether the session is over (shut down, closed by the head, or lost and not taken up
    /// again): nothing more is sent, and results still pending have failed with
    /// `Disconnected`. False while the client waits for a restarted head.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection (pending results fail with `Disconnected`).
    pub async fn shutdown(&self) {
        self.leaving.store(true, Ordering::Release);
        let (sender, connection) = {
            let link = lock(&self.link);
            (link.sender.clone(), link.connection.clone())
        };
        sender.close_and_flush().await;
        connection.close(0u32.into(), b"bye");
        self.mark_closed("this client shut down".into());
        self.endpoint.wait_idle().await;
    }

    /// The connection was lost: when the head keeps a journal, dial it again until its grace
    /// period ends and take up the session. `Err` says why the session is over.
    async fn take_up_again(&self, lost: &str) -> Result<FrameReader, String> {
        let Some(resume) = &self.resume else { return Err(lost.to_string()) };
        if self.leaving.load(Ordering::Acquire) || self.was_replaced() {
            return Err(lost.to_string());
        }
        lock(&self.link).up = false;
        // Pings in flight will not be answered: their waiters learn it now.
        self.pings.clear();
        let deadline = std::time::Instant::now() + resume.grace;
        tracing::warn!(
            "{}: lost the head ({lost}); taking up {} again when it is back (for up to {:?})",
            self.node_name,
            self.session,
            resume.grace
        );
        let backoff = crate::util::Backoff { first: Duration::from_millis(50), max: Duration::from_secs(1) };
        for attempt in 0.. {
            let wait = backoff.delay(attempt);
            match self.try_resume(resume).await {
                Ok(reader) => {
                    tracing::info!("{}: took up {} again", self.node_name, self.session);
                    return Ok(reader);
                }
                Err(Retry::Never(reason)) => {
                    return Err(format!("{lost}; the restarted head refused the session: {reason}"));
                }
                Err(Retry::Later(reason)) if std::time::Instant::now() + wait >= deadline => {
                    return Err(format!(
                        "{lost}; the head did not come back within its grace period of {:?} (last try: {reason})",
                        resume.grace
                    ));
                }
                Err(Retry::Later(_)) => {}
            }
            if self.leaving.load(Ordering::Acquire) {
                return Err(lost.to_string());
            }
            tokio::time::sleep(wait).await;
        }
        unreachable!("the attempts above never run out")
    }

    async fn try_resume(&self, resume: &Resumable) -> Result<FrameReader, Retry> {
        let later = |e: String| Retry::Later(e);
        let connecting =
            self.endpoint.connect(self.peer, HEAD_SERVER_NAME).map_err(|e| later(e.to_string()))?;
        let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| later("no answer".into()))?
            .map_err(|e| later(e.to_string()))?;
        let (send, recv) = connection.open_bi().await.map_err(|e| later(e.to_string()))?;
        let sender = FrameSender::spawn(send);
        let mut known: Vec<TaskAttempt> = lock(&self.link).leases.iter().copied().collect();
        known.sort_unstable();
        let mut waiting: Vec<TaskId> = self
            .slots
            .iter()
            .filter(|slot| matches!(slot.state, SlotState::Pending | SlotState::Stored { .. }))
            .map(|slot| *slot.key())
            .collect();
        waiting.sort_unstable();
        // One never numbered goes again with the unacknowledged frames; the head tells the
        // others apart by their numbers.
        let starts: Vec<UnansweredStart> =
            lock(&self.link).starts.values().filter(|start| start.frame > 0).cloned().collect();
        let message = PeerToHead::Resume(ResumeSession {
            protocol_version: PROTOCOL_VERSION,
            session: self.session,
            journal_id: resume.journal_id,
            known,
            waiting: waiting.clone(),
            starts,
        });
        sender.send(&message).map_err(|e| Retry::Never(e.to_string()))?;
        let mut reader = FrameReader::new(recv);
        match first_answer(&mut reader).await.map_err(|e| later(e.to_string()))? {
            HeadToPeer::Welcome { resumed_through, .. } => {
                // A value announced as stored is fetched again on the new connection.
                for task in waiting {
                    if let Some(mut slot) = self.slots.get_mut(&task)
                        && matches!(slot.state, SlotState::Stored { .. })
                    {
                        slot.state = SlotState::Stored { fetching: false };
                    }
                }
                let resent = lock(&self.link).resumed(sender, connection, resumed_through);
                let unanswered: Vec<PeerToHead> = self
                    .slots
                    .iter()
                    .filter(|slot| matches!(slot.state, SlotState::Pending) && !resent.contains(slot.key()))
                    .filter_map(|slot| {
                        slot.again.as_deref().filter(|r| r.repeatable_request().is_some()).cloned()
                    })
                    .collect();
                for request in unanswered {
                    let _ = self.send(&request);
                }
                Ok(reader)
            }
            HeadToPeer::Rejected { reason } => Err(Retry::Never(reason)),
            other => Err(later(format!("unexpected first message {other:?}"))),
        }
    }
}

/// The head's answer to a hello or a resume: the first message on the stream.
async fn first_answer(reader: &mut FrameReader) -> Result<HeadToPeer, JoinError> {
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next_frame())
        .await
        .map_err(|_| JoinError::NoAnswer(format!("the head did not answer within {HANDSHAKE_TIMEOUT:?}")))?
        .map_err(|e| JoinError::NoAnswer(format!("reading the head's answer: {e}")))?
        .ok_or_else(|| JoinError::NoAnswer("the head closed the connection before answering".into()))?;
    decode_body::<HeadToPeer>(first).map_err(|e| JoinError::Protocol(e.to_string()))
}

/// Why taking up a session failed.
enum Retry {
    /// The head is not back yet (or the network is not): try again.
    Later(String),
    /// The head is back and refuses it: no use trying again.
    Never(String),
}

/// The run a `Finished` message reports.
fn finished_run(message: &PeerToHead) -> Option<TaskAttempt> {
    match message {
        PeerToHead::Finished { task, attempt, .. } => Some(TaskAttempt { task: *task, attempt: *attempt }),
        _ => None,
    }
}

fn lock(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    // Only whole frames are queued under the lock: a panic elsewhere leaves it consistent.
    link.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn read_loop(
    client: Arc<Client>,
    mut reader: FrameReader,
    executions: mpsc::UnboundedSender<Execution>,
) {
    let mut last_infeasible: Option<String> = None;
    let reason = loop {
        let lost = read_frames(&client, &mut reader, &executions, &mut last_infeasible).await;
        match client.take_up_again(&lost).await {
            Ok(resumed) => reader = resumed,
            Err(reason) => break reason,
        }
    };
    tracing::debug!("client {}: {reason}", client.session);
    client.mark_closed(reason);
}

/// Handles what the head sends until the connection ends; returns why it did.
async fn read_frames(
    client: &Arc<Client>,
    reader: &mut FrameReader,
    executions: &mpsc::UnboundedSender<Execution>,
    last_infeasible: &mut Option<String>,
) -> String {
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return "the head closed the connection".to_string(),
            Err(TransportError::Read(quinn::ReadError::ConnectionLost(e))) => {
                if let quinn::ConnectionError::ApplicationClosed(close) = &e
                    && CloseCode::from_value(close.error_code.into_inner()) == Some(CloseCode::Replaced)
                {
                    client.replaced.store(true, Ordering::Release);
                    return format!("{}", String::from_utf8_lossy(&close.reason));
                }
                return format!("connection lost: {e}");
            }
            Err(e) => return e.to_string(),
        };
        let message = match decode_body::<HeadToPeer>(frame) {
            Ok(message) => message,
            Err(e) => return format!("from the head: {e}"),
        };
        match message {
            HeadToPeer::Done { task, done } => {
                lock(&client.link).starts.remove(&task);
                let state = match done {
                    Done::Value(value) => SlotState::Value(Arc::new(value)),
                    Done::Stored { .. } => SlotState::Stored { fetching: false },
                    Done::Failed(error) => SlotState::Failed(error.into()),
                };
                if let SlotState::Stored { .. } = state {
                    // Only announce: the value is fetched when someone asks for it.
                    if let Some(mut slot) = client.slots.get_mut(&task) {
                        slot.state = state;
                        if !slot.waiters.is_empty() {
                            slot.state = SlotState::Stored { fetching: true };
                            let _ = client.send(&PeerToHead::Fetch { task });
                        }
                    }
                } else {
                    client.finish_slot(task, state);
                }
            }
            HeadToPeer::Fetched { task, outcome } => {
                let state = match outcome {
                    Some(Outcome::Value(value)) => SlotState::Value(Arc::new(value)),
                    Some(Outcome::Failed(error)) => SlotState::Failed(error.into()),
                    None => SlotState::Failed(Error::ResultLost { task }),
                };
                client.finish_slot(task, state);
            }
            HeadToPeer::Infeasible { task, reason } => {
                if last_infeasible.as_deref() != Some(reason.as_str()) {
                    tracing::warn!("{task} (and others like it) cannot run on any node now: {reason}");
                    *last_infeasible = Some(reason.clone());
                }
                if let Some(mut slot) = client.slots.get_mut(&task) {
                    slot.infeasible = Some(reason);
                }
            }
            HeadToPeer::Execute { task, attempt, function, args, tag, bypass, job, timeout_ms } => {
                client.leased(TaskAttempt { task, attempt });
                // Said at once: only an attempt the head heard of counts against the retries
                // if this worker dies now.
                if let Err(e) = client.send(&PeerToHead::Started { task, attempt }) {
                    tracing::warn!(%task, attempt, "could not acknowledge the task: {e}");
                }
                let timeout = timeout_ms.map(Duration::from_millis);
                forward(
                    executions,
                    Execution::Task { task, attempt, function, args, tag, bypass, job, timeout },
                )
            }
            HeadToPeer::StartInstance { task, service, type_name, args } => {
                client.leased(TaskAttempt { task, attempt: 0 });
                forward(executions, Execution::StartInstance { task, service, type_name, args })
            }
            HeadToPeer::CallInstance { task, service, method, args } => {
                client.leased(TaskAttempt { task, attempt: 0 });
                forward(executions, Execution::CallInstance { task, service, method, args })
            }
            HeadToPeer::StopInstance { service } => forward(executions, Execution::StopInstance { service }),
            HeadToPeer::Cancel { task, force } => forward(executions, Execution::Cancel { task, force }),
            HeadToPeer::Durable { through } => lock(&client.link).durable(through),
            HeadToPeer::Pong { nonce } => {
                if let Some((_, pong)) = client.pings.remove(&nonce) {
                    let _ = pong.send(());
                }
            }
            HeadToPeer::Welcome { .. } | HeadToPeer::Rejected { .. } => {
                tracing::warn!("ignoring a repeated handshake message from the head");
            }
        }
    }
}

fn forward(executions: &mpsc::UnboundedSender<Execution>, work: Execution) {
    if let Err(e) = executions.send(work) {
        tracing::error!("the head sent work to a process that runs no worker; ignoring {:?}", e.0);
    }
}
