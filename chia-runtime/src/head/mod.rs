//! The head's driver: accepts authenticated QUIC connections, decodes frames, feeds them to the
//! I/O-free [`HeadCore`] with the time, and carries out its actions — frames to send,
//! connections to close, the services file to write. Every decision is the core's.
//!
//! One core behind one mutex. Connection tasks decode frames without it and then apply each
//! message under it; nothing inside awaits, so the lock is held for microseconds, and a message
//! costs no hand-off to another task. One timer task sleeps until the core's deadline
//! ([`HeadCore::poll_timeout`]) instead of ticking.
//!
//! What must be durable before peers may see its effects (the services file) is written by a
//! thread of its own, outside the lock; until it is on disk, the frames decided after it wait,
//! so nobody is told of a service that a restarted head would not know.
//!
//! The head's own node (`head`, which hosts services pinned to the head) is a worker like any
//! other and is started by whoever starts the head: [`HeadWithNode`](crate::local::HeadWithNode).
//! This module depends on the network layer only.

mod persist;

use crate::error::Error;
use crate::net::tls::{ClusterCredentials, HeadCredentials};
use crate::net::transport::{FrameReader, FrameSender};
use chia_core::SessionId;
use chia_core::protocol::{HeadToPeer, PeerToHead, decode_body};
use chia_head_core::{Action, CoreOptions, HeadCore, PersistedService};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

pub use chia_core::HEAD_NODE_NAME;
pub use chia_head_core::{HeadStats, INLINE_RESULT_BYTES};

/// How long a connected peer has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// A running head.
pub struct HeadHandle {
    address: SocketAddr,
    endpoint: quinn::Endpoint,
    credentials: HeadCredentials,
    shared: Arc<Shared>,
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
    /// same directory starts them again (the cache with its entries) once its own node has
    /// joined. `None`: not kept.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for HeadOptions {
    fn default() -> Self {
        let core = CoreOptions::default();
        HeadOptions { heartbeat: core.heartbeat, heartbeat_timeout: core.heartbeat_timeout, state_dir: None }
    }
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
        self.shared.lock().core.stats()
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.shared.lock().core.shut_down();
        self.shared.timer.notify_one();
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

/// Starts a head listening on `listen` with `credentials`. Its own node is not joined yet:
/// [`HeadWithNode`](crate::local::HeadWithNode) starts both.
pub async fn start_head(listen: SocketAddr, credentials: HeadCredentials) -> Result<HeadHandle, Error> {
    start_head_with(listen, credentials, HeadOptions::default()).await
}

/// [`start_head`] with explicit [`HeadOptions`]. The services kept in the state directory
/// start again when the head's own node joins: those pinned to the head need it.
pub async fn start_head_with(
    listen: SocketAddr,
    credentials: HeadCredentials,
    options: HeadOptions,
) -> Result<HeadHandle, Error> {
    let server = credentials.server_config().map_err(|e| Error::Setup(e.to_string()))?;
    let endpoint = quinn::Endpoint::server(server, listen)
        .map_err(|e| Error::Setup(format!("cannot listen on {listen}: {e}")))?;
    let address = endpoint.local_addr().map_err(|e| Error::Setup(e.to_string()))?;
    let service_file = options.state_dir.as_deref().map(persist::ServiceFile::in_dir);
    let core_options = CoreOptions {
        heartbeat: options.heartbeat,
        heartbeat_timeout: options.heartbeat_timeout,
        keep_services: service_file.is_some(),
    };
    let kept = service_file.as_ref().map(persist::ServiceFile::read).unwrap_or_default();
    let shared = Shared::new(HeadCore::new(Instant::now(), core_options), service_file, kept);
    tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
    tokio::spawn(run_timer(Arc::downgrade(&shared), shared.timer.clone()));
    tracing::info!("head listening on {address}");
    Ok(HeadHandle { address, endpoint, credentials, shared })
}

/// The core and the connections its sessions run on.
struct Shared {
    state: Mutex<State>,
    /// Wakes the timer task: the deadline moved earlier, or the head stops.
    timer: Arc<tokio::sync::Notify>,
    /// Writes the services file outside the lock; `None` without a state directory.
    saver: Option<std::sync::mpsc::Sender<Vec<PersistedService>>>,
}

struct State {
    core: HeadCore,
    peers: HashMap<SessionId, Peer>,
    /// The deadline the timer task sleeps until.
    armed: Option<Instant>,
    /// A services file write is under way: the actions decided after it wait here, in order,
    /// so no peer hears of what is not durable yet.
    saving: bool,
    held: VecDeque<Action>,
    /// The services kept from before a restart, started again when the head's own node joins.
    kept: Vec<PersistedService>,
}

struct Peer {
    sender: FrameSender,
    connection: quinn::Connection,
    /// Bytes received on the connection when the timer last looked: a node in the middle of
    /// sending a large frame is alive although no whole frame arrived for a while.
    received: u64,
}

impl Shared {
    fn new(
        core: HeadCore,
        service_file: Option<persist::ServiceFile>,
        kept: Vec<PersistedService>,
    ) -> Arc<Shared> {
        Arc::new_cyclic(|weak: &Weak<Shared>| {
            let saver = service_file.map(|file| {
                let (saves, pending) = std::sync::mpsc::channel::<Vec<PersistedService>>();
                let shared = weak.clone();
                std::thread::Builder::new()
                    .name("chia-head-save".into())
                    .spawn(move || save_services(file, pending, shared))
                    .expect("a thread can be started");
                saves
            });
            Shared {
                state: Mutex::new(State {
                    core,
                    peers: HashMap::new(),
                    armed: None,
                    saving: false,
                    held: VecDeque::new(),
                    kept,
                }),
                timer: Arc::new(tokio::sync::Notify::new()),
                saver,
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The core does not panic on peer input; if a bug ever made it panic, keep serving the
        // state as it is rather than taking the whole head down.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Feeds the core and carries out what it decided.
    fn apply<R>(&self, input: impl FnOnce(&mut HeadCore) -> R) -> R {
        let mut state = self.lock();
        let result = input(&mut state.core);
        self.carry_out(&mut state);
        result
    }

    fn carry_out(&self, state: &mut State) {
        while let Some(action) = state.core.poll_action() {
            if state.saving {
                state.held.push_back(action);
            } else {
                self.act(state, action);
            }
        }
        let deadline = state.core.poll_timeout();
        if deadline.is_some_and(|deadline| state.armed.is_none_or(|armed| deadline < armed)) {
            self.timer.notify_one();
        }
    }

    fn act(&self, state: &mut State, action: Action) {
        match action {
            Action::Send { to, frame } => {
                if let Some(peer) = state.peers.get(&to) {
                    peer.sender.send_frame(frame);
                }
            }
            Action::Close { session, reason } => {
                if let Some(peer) = state.peers.remove(&session) {
                    peer.sender.close();
                    peer.connection.close(0u32.into(), reason.as_bytes());
                }
            }
            Action::SaveServices(services) => {
                if let Some(saver) = &self.saver
                    && saver.send(services).is_ok()
                {
                    state.saving = true;
                }
            }
        }
    }

    /// The services file is on disk: what waited for it goes now (up to the next write).
    fn saved(&self) {
        let mut state = self.lock();
        state.saving = false;
        while !state.saving {
            let Some(action) = state.held.pop_front() else { break };
            self.act(&mut state, action);
        }
    }
}

/// Writes each set of services the core asks to keep, then lets the frames that waited go.
fn save_services(
    file: persist::ServiceFile,
    pending: std::sync::mpsc::Receiver<Vec<PersistedService>>,
    shared: Weak<Shared>,
) {
    while let Ok(services) = pending.recv() {
        file.save(services);
        let Some(shared) = shared.upgrade() else { return };
        shared.saved();
    }
}

/// Sleeps until the core's deadline, then lets it write off the workers not heard from in
/// time. Ends with the head.
async fn run_timer(shared: Weak<Shared>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let deadline = {
            let Some(shared) = shared.upgrade() else { return };
            let mut state = shared.lock();
            if state.core.is_shutting_down() {
                return;
            }
            state.armed = state.core.poll_timeout();
            state.armed
        };
        match deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = wake.notified() => continue,
                }
            }
            None => {
                wake.notified().await;
                continue;
            }
        }
        let Some(shared) = shared.upgrade() else { return };
        let mut state = shared.lock();
        let now = Instant::now();
        let State { core, peers, .. } = &mut *state;
        for (&session, peer) in peers.iter_mut() {
            let received = peer.connection.stats().udp_rx.bytes;
            if received != peer.received {
                peer.received = received;
                core.heard(now, session);
            }
        }
        core.handle_timeout(now);
        shared.carry_out(&mut state);
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, shared.clone()));
    }
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
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
    let first = match tokio::time::timeout(HELLO_TIMEOUT, reader.next_frame()).await {
        Ok(Ok(Some(frame))) => decode_body::<PeerToHead>(frame),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return reject(format!("bad first frame: {e}")),
        Err(_) => return reject(format!("no hello within {HELLO_TIMEOUT:?}")),
    };
    let first = match first {
        Ok(first) => first,
        Err(e) => return reject(format!("malformed hello: {e}")),
    };
    let opened = {
        let mut state = shared.lock();
        let now = Instant::now();
        let claims_head_node =
            matches!(&first, PeerToHead::Hello { worker: Some(offer), .. } if offer.head_node);
        let opened = state.core.open_session(now, &remote.to_string(), first);
        if let Ok(session) = opened {
            let received = connection.stats().udp_rx.bytes;
            let peer = Peer { sender: sender.clone(), connection: connection.clone(), received };
            state.peers.insert(session, peer);
            // The core names only the first node that claims to be the head's own `head`.
            let is_head_node = claims_head_node && state.core.session_name(session) == Some(HEAD_NODE_NAME);
            if is_head_node && !state.kept.is_empty() {
                let kept = std::mem::take(&mut state.kept);
                state.core.restore_services(now, kept);
            }
        }
        shared.carry_out(&mut state);
        opened
    };
    let session = match opened {
        Ok(session) => session,
        Err(rejection) => return reject(rejection.reason),
    };
    let reason = loop {
        match reader.next_frame().await {
            Ok(Some(frame)) => match decode_body::<PeerToHead>(frame) {
                Ok(message) => shared.apply(|core| core.handle(Instant::now(), session, message)),
                Err(e) => break format!("malformed message: {e}"),
            },
            Ok(None) => break "closed by the peer".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    connection.close(2u32.into(), reason.as_bytes());
    shared.apply(|core| core.close_session(Instant::now(), session, &reason));
}
