//! One connection to the head, as used by a driver and by a worker's nested calls.
//!
//! The client keeps a slot per task it submitted: pending, a value, a value still on the head
//! (large results are fetched on demand), or an error. `get` and `wait` park on a slot's
//! waiters; the reader task fills slots as `Done`/`Fetched` frames arrive.

use crate::error::Error;
use crate::net::tls::{ClusterCredentials, HEAD_SERVER_NAME};
use crate::net::transport::{FrameReader, FrameSender, TransportError};
use chia_core::protocol::{
    ArgValue, BypassSpec, Done, HeadToPeer, JobSettings, Outcome, PROTOCOL_VERSION, PeerToHead, Value,
    WorkerOffer, decode_body,
};
use chia_core::{NodeId, ServiceId, SessionId, TaskError, TaskId};
use dashmap::DashMap;
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

/// Tells the head this worker is alive, as often as it asked, until the connection ends. A
/// frozen process (SIGSTOP, a stalled machine) stops sending, which is how the head notices.
async fn send_heartbeats(client: std::sync::Weak<Client>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(client) = client.upgrade() else { return };
        if client.is_closed() || client.send(&PeerToHead::Heartbeat).is_err() {
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
}

pub struct Client {
    session: SessionId,
    node: Option<NodeId>,
    node_name: String,
    next_seq: AtomicU64,
    sender: FrameSender,
    slots: DashMap<TaskId, Slot>,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    pings: DashMap<u64, tokio::sync::oneshot::Sender<()>>,
    next_ping: AtomicU64,
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
    runtime: tokio::runtime::Handle,
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
        let setup =
            |message: String| Error::Setup(format!("could not join the cluster at {address}: {message}"));
        let peer: SocketAddr = tokio::net::lookup_host(&address)
            .await
            .map_err(|e| setup(format!("cannot resolve the address: {e}")))?
            .next()
            .ok_or_else(|| setup("the address resolves to nothing".into()))?;
        let bind: SocketAddr = if peer.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }
            .expect("literal socket addresses parse");
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| setup(e.to_string()))?;
        endpoint.set_default_client_config(credentials.client_config().map_err(|e| setup(e.to_string()))?);
        let connection = endpoint
            .connect(peer, HEAD_SERVER_NAME)
            .map_err(|e| setup(e.to_string()))?
            .await
            .map_err(|e| setup(format!("TLS/QUIC handshake failed: {e}")))?;
        let (send, recv) = connection.open_bi().await.map_err(|e| setup(e.to_string()))?;
        let sender = FrameSender::spawn(send);
        sender
            .send(&PeerToHead::Hello {
                protocol_version: PROTOCOL_VERSION,
                name: name.to_string(),
                worker: offer,
            })
            .map_err(|e| setup(e.to_string()))?;
        let mut reader = FrameReader::new(recv);
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next_frame())
            .await
            .map_err(|_| setup("the head did not answer the hello".into()))?
            .map_err(|e| setup(e.to_string()))?
            .ok_or_else(|| setup("the head closed the connection during the hello".into()))?;
        let (session, node, node_name, heartbeat_ms) = match decode_body::<HeadToPeer>(first)
            .map_err(|e| setup(e.to_string()))?
        {
            HeadToPeer::Welcome { session, node, node_name, heartbeat_ms, .. } => {
                (session, node, node_name, heartbeat_ms)
            }
            HeadToPeer::Rejected { reason } => return Err(setup(format!("the head rejected us: {reason}"))),
            other => return Err(setup(format!("unexpected first message {other:?}"))),
        };
        let client = Arc::new(Client {
            session,
            node,
            node_name,
            next_seq: AtomicU64::new(1),
            sender,
            slots: DashMap::new(),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            pings: DashMap::new(),
            next_ping: AtomicU64::new(1),
            connection,
            endpoint,
            runtime: tokio::runtime::Handle::current(),
        });
        if heartbeat_ms > 0 {
            tokio::spawn(send_heartbeats(Arc::downgrade(&client), Duration::from_millis(heartbeat_ms)));
        }
        let (executions, execution_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(client.clone(), reader, executions));
        Ok((client, execution_rx))
    }

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
        self.slots.insert(task, Slot { state: SlotState::Pending, infeasible: None, waiters: Vec::new() });
        if self.closed.load(Ordering::Acquire) {
            self.finish_slot(task, SlotState::Failed(self.disconnected()));
            return;
        }
        if let Err(e) = self.sender.send(message) {
            let error = TaskError::InvalidCall { function: function.to_string(), message: e.to_string() };
            self.finish_slot(task, SlotState::Failed(error.into()));
        }
    }

    /// Opens a slot that is already failed (a call rejected before sending).
    pub(crate) fn fail_locally(&self, task: TaskId, error: TaskError) {
        self.slots.insert(
            task,
            Slot { state: SlotState::Failed(error.into()), infeasible: None, waiters: Vec::new() },
        );
    }

    /// Every `ObjectRef` to `task` is gone.
    pub(crate) fn release(&self, task: TaskId) {
        if self.slots.remove(&task).is_some() && !self.closed.load(Ordering::Acquire) {
            let _ = self.sender.send(&PeerToHead::Release { tasks: vec![task] });
        }
    }

    pub(crate) fn send(&self, message: &PeerToHead) -> Result<(), chia_core::protocol::ProtocolError> {
        self.sender.send(message)
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

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection (pending results fail with `Disconnected`).
    pub async fn shutdown(&self) {
        self.sender.close_and_flush().await;
        self.connection.close(0u32.into(), b"bye");
        self.mark_closed("this client shut down".into());
        self.endpoint.wait_idle().await;
    }
}

async fn read_loop(
    client: Arc<Client>,
    mut reader: FrameReader,
    executions: mpsc::UnboundedSender<Execution>,
) {
    let mut last_infeasible: Option<String> = None;
    let reason = loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the head closed the connection".to_string(),
            Err(TransportError::Read(quinn::ReadError::ConnectionLost(e))) => {
                break format!("connection lost: {e}");
            }
            Err(e) => break e.to_string(),
        };
        let message = match decode_body::<HeadToPeer>(frame) {
            Ok(message) => message,
            Err(e) => break format!("the head sent a malformed message: {e}"),
        };
        match message {
            HeadToPeer::Done { task, done } => {
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
                    None => {
                        SlotState::Failed(Error::Disconnected(format!("the head no longer holds {task}")))
                    }
                };
                client.finish_slot(task, state);
            }
            HeadToPeer::Infeasible { task, reason } => {
                if last_infeasible.as_deref() != Some(reason.as_str()) {
                    tracing::warn!("{task} (and others like it) cannot run on any node now: {reason}");
                    last_infeasible = Some(reason.clone());
                }
                if let Some(mut slot) = client.slots.get_mut(&task) {
                    slot.infeasible = Some(reason);
                }
            }
            HeadToPeer::Execute { task, attempt, function, args, tag, bypass, job } => {
                forward(&executions, Execution::Task { task, attempt, function, args, tag, bypass, job })
            }
            HeadToPeer::StartInstance { task, service, type_name, args } => {
                forward(&executions, Execution::StartInstance { task, service, type_name, args })
            }
            HeadToPeer::CallInstance { task, service, method, args } => {
                forward(&executions, Execution::CallInstance { task, service, method, args })
            }
            HeadToPeer::StopInstance { service } => forward(&executions, Execution::StopInstance { service }),
            HeadToPeer::Cancel { task, force } => forward(&executions, Execution::Cancel { task, force }),
            HeadToPeer::Pong { nonce } => {
                if let Some((_, pong)) = client.pings.remove(&nonce) {
                    let _ = pong.send(());
                }
            }
            HeadToPeer::Welcome { .. } | HeadToPeer::Rejected { .. } => {
                tracing::warn!("ignoring a repeated handshake message from the head");
            }
        }
    };
    tracing::debug!("client {}: {reason}", client.session);
    client.mark_closed(reason);
}

fn forward(executions: &mpsc::UnboundedSender<Execution>, work: Execution) {
    if let Err(e) = executions.send(work) {
        tracing::error!("the head sent work to a process that runs no worker; ignoring {:?}", e.0);
    }
}
