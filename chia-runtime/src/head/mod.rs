//! The head's driver: accepts authenticated QUIC connections, decodes frames, feeds them to the
//! I/O-free [`HeadCore`] with the time, and carries out its actions — frames to send,
//! connections to close, the services file to write. Every decision is the core's.
//!
//! One core behind one mutex. Connection tasks decode frames without it and then apply each
//! message under it; nothing inside awaits, so the lock is held for microseconds, and a message
//! costs no hand-off to another task. One timer task sleeps until the core's deadline
//! ([`HeadCore::poll_timeout`]) instead of ticking.
//!
//! With a state directory the head keeps a journal ([`journal`]): the core says which inputs
//! change state ([`Action::Keep`]), and one thread of its own, outside the lock, appends them
//! in batches with one `fdatasync` each (group commit) and writes the services file. Until a
//! batch is on disk, every frame decided after it waits, so no peer is told anything that a
//! restarted head would not know; once it is, each session whose frames it holds is told how
//! far it is durable (`Durable`), so peers can forget what they would otherwise send again.
//! A head started on a directory with a journal rebuilds its state from it
//! ([`HeadCore::recover`]) and waits [`HeadOptions::resume_grace`] for the previous run's
//! peers to take up their sessions. Once the journal has grown by
//! [`HeadOptions::compact_journal_after`], the keeper starts it again from a snapshot of the
//! core's state taken under the lock (the records not written yet are part of it).
//!
//! The head's own node (`head`, which hosts services pinned to the head) is a worker like any
//! other and is started by whoever starts the head: [`HeadWithNode`](crate::local::HeadWithNode).
//! With [`HeadHandle::serve_metrics`] the head also serves Prometheus metrics over HTTP
//! ([`metrics`]). This module depends on the network layer only.

// What a peer sends must never panic this process: no `unwrap` outside tests (an `expect`
// states the invariant that makes it impossible).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod journal;
pub mod metrics;
mod persist;

use crate::error::{Error, HeadStartError};
use crate::net::tls::{ClusterCredentials, HeadCredentials};
use crate::net::transport::{FrameReader, FrameSender};
use chia_core::SessionId;
use chia_core::TaskError;
use chia_core::protocol::{CloseCode, HeadToPeer, Outcome, PeerToHead, decode_body};
use chia_head_core::{Action, CoreOptions, HeadCore, JournalEntry, OwnNodeCall, PersistedService};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

pub use chia_head_core::HeadStats;

/// How long a connected peer has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress above which a peer must first prove it receives at its address
/// (a QUIC Retry: stateless, so a flood of Initials from spoofed addresses costs nothing).
const VALIDATE_ABOVE: usize = 16;
/// Handshakes in progress, validated or not, beyond which new ones are refused: what peers
/// that never finish can make the head hold is bounded (a handshake holds some tens of KB).
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one source (an IPv4 address, an IPv6 /64) beyond which its new
/// ones are refused: one address that starts handshakes and never finishes them (it answers
/// the Retry, so it is no spoofer) cannot fill `MAX_HANDSHAKES` and lock every other peer out.
/// Well above what one host's honest peers have in progress at once (a handshake takes a few
/// round trips); a refused peer is told so and tries again.
const MAX_HANDSHAKES_PER_SOURCE: usize = 32;
/// Queued bytes to a peer above which the head stops reading what it sends: a peer that does
/// not take its answers slows itself down, not the head's memory.
const SEND_BACKLOG_LIMIT: usize = 32 << 20;

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
    /// Where the head keeps its journal and the specifications of detached services, so that
    /// a head restarted on the same directory takes up where it was: its tasks, results,
    /// sessions and services, and the detached services (the cache with its entries) once
    /// its own node has joined. `None`: nothing is kept.
    pub state_dir: Option<std::path::PathBuf>,
    /// How long a head restarted from its journal waits for the previous run's drivers and
    /// workers to take up their sessions; one that stays away longer is treated as gone.
    pub resume_grace: Duration,
    /// Once the journal has grown by this many bytes since it last started from a snapshot,
    /// it starts again from one (the head's whole state as a record): start-up replays at
    /// most about this much.
    pub compact_journal_after: u64,
    /// The watchdog warns of queued tasks that a node had the function and room for and that
    /// waited this long unplaced (shown by `chia status`, counted in the metrics).
    pub stuck_after: Duration,
}

impl Default for HeadOptions {
    fn default() -> Self {
        let core = CoreOptions::default();
        HeadOptions {
            heartbeat: core.heartbeat,
            heartbeat_timeout: core.heartbeat_timeout,
            state_dir: None,
            resume_grace: core.resume_grace,
            compact_journal_after: 64 << 20,
            stuck_after: core.stuck_after,
        }
    }
}

impl HeadHandle {
    /// The head's own node runs in this process: calls to its instances are handed to it
    /// directly from now on.
    pub(crate) fn attach_own_node(&self, node: Weak<dyn OwnNode>) {
        *self.shared.own_node.lock().unwrap_or_else(|p| p.into_inner()) = Some(node);
    }

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
        self.shared.stopping.send_replace(true);
        self.shared.timer.notify_one();
        self.shared.stop_keeping();
        self.endpoint.close(CloseCode::Ended.value().into(), b"head shutting down");
        // Their streams would keep the endpoint, and its socket, alive.
        for (_, peer) in self.shared.lock().peers.drain() {
            peer.sender.close();
        }
    }

    /// Serves the cluster's metrics at `http://LISTEN/metrics` (Prometheus text format) until
    /// the head stops; returns the address it listens on (`127.0.0.1:0` picks a port). The
    /// endpoint is unauthenticated: a `listen` address that is not loopback is served, with a
    /// warning in the log.
    pub async fn serve_metrics(&self, listen: SocketAddr) -> Result<SocketAddr, metrics::MetricsError> {
        metrics::serve(listen, Arc::downgrade(&self.shared), self.shared.stopping.subscribe()).await
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

/// Starts a head listening on `listen` with `credentials` and `options`. Its own node is not
/// joined yet: [`HeadWithNode`](crate::local::HeadWithNode) starts both. The services kept in
/// the state directory start again when the head's own node joins: those pinned to the head
/// need it.
pub async fn start_head_with(
    listen: SocketAddr,
    credentials: HeadCredentials,
    options: HeadOptions,
) -> Result<HeadHandle, Error> {
    // With a state directory, `chia-head revoke` may refuse members while the head runs.
    let revocations = match &options.state_dir {
        Some(state_dir) => Some(
            crate::net::members::RevocationList::open(state_dir)
                .map_err(|e| HeadStartError::Credentials(Box::new(e)))?
                as Arc<dyn crate::net::tls::MemberCheck>,
        ),
        None => None,
    };
    let server = credentials
        .server_config_checked(revocations)
        .map_err(|e| HeadStartError::Credentials(Box::new(e)))?;
    let cannot_listen = |cause: std::io::Error| HeadStartError::Listen { address: listen, cause };
    let socket = std::net::UdpSocket::bind(listen).map_err(cannot_listen)?;
    let runtime = quinn::default_runtime().ok_or(HeadStartError::NoRuntime)?;
    let endpoint = quinn::Endpoint::new(credentials.endpoint_config(), Some(server), socket, runtime)
        .map_err(cannot_listen)?;
    let address = endpoint.local_addr().map_err(cannot_listen)?;
    let now = Instant::now();
    let mut core_options = CoreOptions {
        heartbeat: options.heartbeat,
        heartbeat_timeout: options.heartbeat_timeout,
        keep_services: options.state_dir.is_some(),
        resume_grace: options.resume_grace,
        stuck_after: options.stuck_after,
        // Its own node joins from this process ([`HeadHandle::attach_own_node`]); until it
        // does, calls to it go as frames.
        own_node_in_process: true,
        ..CoreOptions::default()
    };
    let (core, keeper) = match &options.state_dir {
        None => (HeadCore::new(now, core_options), None),
        Some(state_dir) => {
            let opened =
                journal::Journal::open(state_dir).map_err(|e| HeadStartError::Journal(Box::new(e)))?;
            core_options.journal_id = Some(opened.journal.id());
            let recovered = !opened.entries.is_empty();
            let dropped = opened.dropped_bytes;
            // The grace period starts once the journal is read, however long that took.
            let journal_path = state_dir.join("journal");
            let (mut core, recovery) = HeadCore::recover(Instant::now(), core_options, opened.entries)
                .map_err(|cause| HeadStartError::Recover { path: journal_path.clone(), cause })?;
            let services = persist::ServiceFile::in_dir(state_dir);
            core.restore_services(now, services.read());
            if recovered {
                tracing::info!(
                    "recovered from {}{} ({dropped} byte(s) of a torn tail dropped); waiting up to {:?} for its drivers and workers to come back",
                    journal_path.display(),
                    if recovery.from_snapshot { ", starting from its snapshot" } else { "" },
                    options.resume_grace
                );
            }
            let compaction = Compaction {
                after: options.compact_journal_after,
                grown: opened.journal.len(),
                last_snapshot: 0,
            };
            (core, Some((Keeper { journal: opened.journal, services }, compaction)))
        }
    };
    let shared = Shared::new(core, keeper);
    tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
    tokio::spawn(run_timer(Arc::downgrade(&shared), shared.timer.clone()));
    tracing::info!("head listening on {address}");
    Ok(HeadHandle { address, endpoint, credentials, shared })
}

/// What a call handed to the head's own node in process answers with: the call's outcome.
pub(crate) type OwnNodeReply = Box<dyn FnOnce(chia_core::protocol::Outcome) + Send>;

/// The head's own node as its head sees it when both run in one process: the head hands it
/// calls to its instances directly ([`chia_head_core::Action::CallOwnNode`]), with no frame
/// and no loopback connection either way.
pub(crate) trait OwnNode: Send + Sync {
    /// Runs `call` on its instance and answers `reply` with the outcome, always (a call to an
    /// instance this node does not hold fails as `ServiceUnavailable`, as over a connection).
    fn call(&self, call: chia_head_core::OwnNodeCall, reply: OwnNodeReply);
}

/// The core and the connections its sessions run on.
struct Shared {
    state: Mutex<State>,
    /// Wakes the timer task: the deadline moved earlier, or the head stops.
    timer: Arc<tokio::sync::Notify>,
    /// Wakes the keeper thread: something is waiting to be made durable.
    keep: Condvar,
    /// What the driver counts for the metrics endpoint.
    figures: metrics::DriverFigures,
    /// Set when the head stops: the metrics endpoint stops with it.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The head's own node, once it runs in this process and has joined.
    own_node: Mutex<Option<Weak<dyn OwnNode>>>,
    /// This, for the answers of calls handed to the own node.
    me: Weak<Shared>,
    /// Where those answers are fed to the core.
    runtime: tokio::runtime::Handle,
}

struct State {
    core: HeadCore,
    peers: HashMap<SessionId, Peer>,
    /// The deadline the timer task sleeps until.
    armed: Option<Instant>,
    durable: Durable,
}

/// What waits to be made durable, and the actions that wait for it.
#[derive(Default)]
struct Durable {
    /// Whether a keeper runs (the head has a state directory).
    kept: bool,
    /// Encoded journal records not handed to the keeper yet.
    records: Vec<u8>,
    /// The sessions whose messages those records keep, and the last one's number.
    through: HashMap<SessionId, u64>,
    /// The latest set of detached services to keep, if it changed.
    services: Option<Vec<PersistedService>>,
    /// The head's state as a record, which replaces the journal before `records` (compaction).
    snapshot: Option<Vec<u8>>,
    compaction: Compaction,
    /// The keeper is writing a batch.
    writing: bool,
    /// Actions decided after something not yet durable, in order.
    held: VecDeque<Action>,
    stopping: bool,
}

impl Durable {
    fn pending(&self) -> bool {
        !self.records.is_empty() || self.services.is_some() || self.snapshot.is_some()
    }

    /// A frame must wait while anything before it is not durable (and frames keep their order).
    fn must_hold(&self) -> bool {
        self.pending() || self.writing || !self.held.is_empty()
    }
}

/// When the journal starts again from a snapshot.
#[derive(Clone, Copy, Debug, Default)]
struct Compaction {
    /// Bytes of growth after which it does.
    after: u64,
    /// Bytes of journal records since it last did (the whole journal when the head started).
    grown: u64,
    /// The size of the last snapshot: the journal also grows by as much before the next, so
    /// a large state is not written again and again.
    last_snapshot: u64,
}

struct Peer {
    sender: FrameSender,
    connection: quinn::Connection,
    /// The head told its core this peer is behind (see [`HeadCore::set_congested`]); its
    /// reader tells it again once the peer has caught up.
    congested: Arc<AtomicBool>,
    /// Bytes received on the connection when the timer last looked: a node in the middle of
    /// sending a large frame is alive although no whole frame arrived for a while.
    received: u64,
}

/// The files of a state directory, written by the keeper thread.
struct Keeper {
    journal: journal::Journal,
    services: persist::ServiceFile,
}

impl Shared {
    fn new(core: HeadCore, keeper: Option<(Keeper, Compaction)>) -> Arc<Shared> {
        let kept = keeper.is_some();
        let compaction = keeper.as_ref().map(|(_, compaction)| *compaction).unwrap_or_default();
        let shared = Arc::new_cyclic(|me| Shared {
            own_node: Mutex::new(None),
            me: me.clone(),
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(State {
                core,
                peers: HashMap::new(),
                armed: None,
                durable: Durable { kept, compaction, ..Durable::default() },
            }),
            timer: Arc::new(tokio::sync::Notify::new()),
            keep: Condvar::new(),
            figures: metrics::DriverFigures::new(),
            stopping: tokio::sync::watch::Sender::new(false),
        });
        if let Some((keeper, _)) = keeper {
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("chia-head-keep".into())
                .spawn(move || run_keeper(keeper, weak))
                .expect("a thread can be started");
        }
        // What recovery and the restored services decided waits for their peers or goes now.
        shared.carry_out(&mut shared.lock());
        shared
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
        let was_pending = state.durable.pending();
        while let Some(action) = state.core.poll_action() {
            if state.durable.stopping {
                // Shutting down: nothing is kept any more, so nothing it would cause is sent
                // either; a restarted head takes up from what was kept. Connections still close.
                if let Action::Close { .. } = action {
                    self.act(state, action);
                }
                continue;
            }
            match action {
                Action::Keep(entry) if state.durable.kept => {
                    if let JournalEntry::Message { session, seq, .. } = &entry {
                        state.durable.through.insert(*session, *seq);
                    }
                    let before = state.durable.records.len();
                    journal::encode_record(&entry, &mut state.durable.records);
                    state.durable.compaction.grown += (state.durable.records.len() - before) as u64;
                }
                Action::SaveServices(services) if state.durable.kept => {
                    state.durable.services = Some(services)
                }
                Action::Keep(_) | Action::SaveServices(_) => {}
                action if state.durable.must_hold() => state.durable.held.push_back(action),
                action => self.act(state, action),
            }
        }
        self.compact_if_grown(state);
        if !was_pending && state.durable.pending() {
            self.keep.notify_one();
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
                    if peer.sender.backlog() > SEND_BACKLOG_LIMIT
                        && !peer.congested.swap(true, Ordering::AcqRel)
                    {
                        tracing::debug!(
                            "{to} is behind by {} bytes: its results wait to be fetched",
                            peer.sender.backlog()
                        );
                        state.core.set_congested(to, true);
                    }
                }
            }
            Action::Close { session, reason, code } => {
                if let Some(peer) = state.peers.remove(&session) {
                    peer.sender.close();
                    peer.connection.close(code.value().into(), reason.as_bytes());
                }
            }
            Action::CallOwnNode { session, call } => self.call_own_node(state, session, call),
            Action::Keep(_) | Action::SaveServices(_) => {}
        }
    }

    /// Hands `call` to the own node in this process; without one (a head started alone), it
    /// goes as a frame on `session`'s connection like any other.
    ///
    /// Its answer is fed to the core as the own node's `Finished`, counted among that
    /// session's frames although the node never sent it: harmless, as the own node never
    /// takes up its session again (it dies with the head).
    fn call_own_node(&self, state: &mut State, session: SessionId, call: OwnNodeCall) {
        if !state.peers.contains_key(&session) {
            // The node left: like a frame to a departed peer, the call goes nowhere (the core
            // fails it with the node).
            return;
        }
        let task = call.task;
        // The answer may come at once, from inside `call` (a refused call), while this thread
        // holds the state lock, or from the keeper's thread: the core hears it from a task of
        // its own, never here.
        let (me, runtime) = (self.me.clone(), self.runtime.clone());
        let answer = move |outcome: Outcome| {
            runtime.spawn(async move {
                if let Some(shared) = me.upgrade() {
                    let finished = PeerToHead::Finished { task, attempt: 0, outcome };
                    shared.apply(|core| core.handle(Instant::now(), session, finished));
                }
            });
        };
        let node = self.own_node.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(Weak::upgrade);
        let Some(node) = node else {
            match call.frame() {
                Ok(frame) => self.act(state, Action::Send { to: session, frame }),
                Err(e) => {
                    let message = format!("its arguments cannot be sent: {e}");
                    answer(Outcome::Failed(TaskError::InvalidCall { function: call.method, message }));
                }
            }
            return;
        };
        tracing::trace!(task = %task, "handed to the own node in process");
        node.call(call, Box::new(answer));
    }

    /// Once the journal has grown enough, the head's state (which includes everything kept so
    /// far) replaces it: the records not written yet are part of the snapshot.
    fn compact_if_grown(&self, state: &mut State) {
        let durable = &mut state.durable;
        let Compaction { after, grown, last_snapshot } = durable.compaction;
        if !durable.kept || durable.stopping || grown < after.max(last_snapshot) {
            return;
        }
        let Some(snapshot) = state.core.snapshot() else { return };
        let mut record = Vec::new();
        journal::encode_record(&snapshot, &mut record);
        if record.len() > journal::MAX_RECORD {
            tracing::warn!(
                "the head's state ({} bytes) is too large for one journal record; the journal is not compacted",
                record.len()
            );
            durable.compaction =
                Compaction { grown: 0, last_snapshot: record.len() as u64, ..durable.compaction };
            return;
        }
        tracing::info!("compacting the journal: a snapshot of {} bytes replaces it", record.len());
        durable.records.clear();
        durable.compaction =
            Compaction { grown: 0, last_snapshot: record.len() as u64, ..durable.compaction };
        durable.snapshot = Some(record);
    }

    /// Stops the keeper once what is pending is written.
    fn stop_keeping(&self) {
        self.lock().durable.stopping = true;
        self.keep.notify_one();
    }
}

/// The keeper thread: takes what waits to be made durable as one batch, writes it (one
/// `fdatasync` for all its journal records), then lets go the actions that waited for it and
/// tells each session how far it is durable.
fn run_keeper(mut keeper: Keeper, shared: Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else { return };
        let (snapshot, records, through, services, release) = {
            let mut state = strong.lock();
            while !state.durable.pending() && !state.durable.stopping {
                state = strong.keep.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if !state.durable.pending() {
                return;
            }
            let durable = &mut state.durable;
            durable.writing = true;
            let release = durable.held.len();
            (
                durable.snapshot.take(),
                std::mem::take(&mut durable.records),
                std::mem::take(&mut durable.through),
                durable.services.take(),
                release,
            )
        };
        drop(strong);
        // Until the batch is on disk nothing it caused may leave: the head stalls (and says
        // why) rather than tell a peer what a restart would not know.
        let mut failures = 0u32;
        let mut committed_in = None;
        let mut write = |journal: &mut journal::Journal| {
            let started = Instant::now();
            let written = match &snapshot {
                Some(snapshot) => journal.start_again(snapshot, &records),
                None if records.is_empty() => return Ok(()),
                None => journal.append(&records),
            };
            committed_in = Some(started.elapsed());
            written
        };
        while let Err(e) = write(&mut keeper.journal) {
            if failures == 0 {
                tracing::error!(
                    "the journal cannot be written ({e}); the head waits until it can (free the disk)"
                );
            }
            failures = failures.saturating_add(1);
            if shared.upgrade().is_none_or(|strong| strong.lock().durable.stopping) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100).saturating_mul(failures.min(50)));
        }
        if failures > 0 {
            tracing::warn!("the journal is written again after {failures} failed attempt(s)");
        }
        if let Some(services) = services {
            keeper.services.save(services);
        }
        let Some(strong) = shared.upgrade() else { return };
        if let Some(took) = committed_in {
            strong.figures.journal_commit.observe(took.as_secs_f64());
        }
        let mut state = strong.lock();
        state.durable.writing = false;
        for _ in 0..release {
            let Some(action) = state.durable.held.pop_front() else { break };
            strong.act(&mut state, action);
        }
        let mut sessions: Vec<(SessionId, u64)> = through.into_iter().collect();
        sessions.sort_unstable();
        for (session, through) in sessions {
            if let Some(peer) = state.peers.get(&session) {
                let _ = peer.sender.send(&HeadToPeer::Durable { through });
            }
        }
        if !state.durable.pending() {
            // Decided while the batch was written, with nothing new to keep: nothing to wait for.
            while let Some(action) = state.durable.held.pop_front() {
                strong.act(&mut state, action);
            }
        }
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
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    let mut refused = 0u64;
    while let Some(incoming) = endpoint.accept().await {
        let source = source_of(incoming.remote_address());
        let (in_progress, from_source) = {
            let handshakes = lock_handshakes(&handshakes);
            (handshakes.total, handshakes.per_source.get(&source).copied().unwrap_or(0))
        };
        if in_progress >= VALIDATE_ABOVE && !incoming.remote_address_validated() && incoming.may_retry() {
            // Fails only for an Initial that carried a Retry token already.
            match incoming.retry() {
                Ok(()) => {
                    shared.figures.handshakes_retried.inc();
                }
                Err(e) => e.into_incoming().ignore(),
            }
            continue;
        }
        // A validated address is real, so a source that keeps starting handshakes and never
        // finishes them is held to its share, and cannot fill the cap for everyone else.
        let full = if in_progress >= MAX_HANDSHAKES {
            Some(("in all", "total"))
        } else if from_source >= MAX_HANDSHAKES_PER_SOURCE {
            Some(("from its address", "per_source"))
        } else {
            None
        };
        if let Some((full, limit)) = full {
            refused += 1;
            shared.figures.handshakes_refused.get_or_create(&[("limit", limit)]).inc();
            if refused.is_power_of_two() {
                tracing::warn!(
                    "{in_progress} handshakes in progress ({from_source} from its address): refused a connection \
                     from {} as too many are in progress {full} ({refused} refused so far)",
                    incoming.remote_address()
                );
            }
            incoming.refuse();
            continue;
        }
        {
            let mut counts = lock_handshakes(&handshakes);
            counts.total += 1;
            *counts.per_source.entry(source).or_default() += 1;
        }
        shared.figures.handshakes_in_progress.inc();
        let in_progress = shared.figures.handshakes_in_progress.clone();
        let handshake = Handshake { handshakes: handshakes.clone(), source, in_progress };
        tokio::spawn(serve_connection(incoming, handshake, shared.clone()));
    }
}

/// Handshakes in progress, in all and per source.
#[derive(Default)]
struct Handshakes {
    total: usize,
    per_source: HashMap<std::net::IpAddr, usize>,
}

fn lock_handshakes(handshakes: &Mutex<Handshakes>) -> MutexGuard<'_, Handshakes> {
    handshakes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a connection comes from, as far as the handshake limit goes: its IPv4 address, or
/// the /64 of its IPv6 address (what one host, or one customer of a provider, usually has).
fn source_of(remote: SocketAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match remote.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A handshake in progress, counted until it ends either way.
struct Handshake {
    handshakes: Arc<Mutex<Handshakes>>,
    source: std::net::IpAddr,
    /// The metrics' count of the same.
    in_progress: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.in_progress.dec();
        let mut counts = lock_handshakes(&self.handshakes);
        counts.total -= 1;
        if let Some(n) = counts.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.per_source.remove(&self.source);
            }
        }
    }
}

/// Counts a connection as open (for the metrics) while it lives.
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl OpenConnection {
    fn count(open: &prometheus_client::metrics::gauge::Gauge) -> OpenConnection {
        open.inc();
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_connection(incoming: quinn::Incoming, handshake: Handshake, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    // One deadline from the first packet to the hello: QUIC restarts its idle timer at every
    // packet, so a peer trickling handshake packets would otherwise hold its place for ever.
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let failed = |stage: &'static str| {
        shared.figures.handshakes_failed.get_or_create(&[("stage", stage)]).inc();
    };
    let connection = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            failed("tls");
            tracing::warn!("rejected a connection from {remote}: authentication failed ({e})");
            return;
        }
        Err(_) => {
            failed("timeout");
            tracing::warn!("{remote} did not finish its handshake in {HELLO_TIMEOUT:?}; dropped");
            return;
        }
    };
    let _open = OpenConnection::count(&shared.figures.connections_open);
    let (send, recv) = match tokio::time::timeout_at(deadline, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            failed("hello");
            tracing::debug!("{remote} closed before opening its control stream: {e}");
            return;
        }
        Err(_) => {
            failed("timeout");
            tracing::warn!("{remote} opened no control stream in {HELLO_TIMEOUT:?}; closing");
            connection.close(CloseCode::NoHello.value().into(), b"no hello");
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
    let first = match tokio::time::timeout_at(deadline, reader.next_frame()).await {
        Ok(Ok(Some(frame))) => decode_body::<PeerToHead>(frame),
        Ok(Ok(None)) => return failed("hello"),
        Ok(Err(e)) => {
            failed("hello");
            return reject(format!("bad first frame: {e}"));
        }
        Err(_) => {
            failed("timeout");
            return reject(format!("no hello within {HELLO_TIMEOUT:?}"));
        }
    };
    let first = match first {
        Ok(first) => first,
        Err(e) => {
            failed("hello");
            return reject(format!("its hello: {e}"));
        }
    };
    // Authenticated and introduced: it no longer counts against the handshakes in progress.
    drop(handshake);
    let congested = Arc::new(AtomicBool::new(false));
    let opened = {
        let mut state = shared.lock();
        let now = Instant::now();
        let opened = state.core.open_session(now, &remote.to_string(), first);
        if let Ok(session) = opened {
            let received = connection.stats().udp_rx.bytes;
            // A session taken up again on this connection starts uncongested, whatever its
            // previous connection was.
            state.core.set_congested(session, false);
            let congested = congested.clone();
            let peer = Peer { sender: sender.clone(), connection: connection.clone(), congested, received };
            state.peers.insert(session, peer);
        }
        shared.carry_out(&mut state);
        opened
    };
    let session = match opened {
        Ok(session) => session,
        Err(rejection) => {
            failed("hello");
            return reject(rejection.reason);
        }
    };
    shared.figures.connections_accepted.inc();
    let reason = loop {
        sender.wait_for_backlog_below(SEND_BACKLOG_LIMIT).await;
        if congested.load(Ordering::Acquire) && sender.backlog() <= SEND_BACKLOG_LIMIT / 2 {
            // Under the lock the sends that set it run under, so the flag and the core agree.
            shared.apply(|core| {
                if congested.swap(false, Ordering::AcqRel) {
                    core.set_congested(session, false);
                }
            });
        }
        match reader.next_frame().await {
            Ok(Some(frame)) => match decode_body::<PeerToHead>(frame) {
                Ok(message) => shared.apply(|core| core.handle(Instant::now(), session, message)),
                Err(e) => break e.to_string(),
            },
            Ok(None) => break "closed by the peer".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    connection.close(CloseCode::Unreadable.value().into(), reason.as_bytes());
    shared.apply(|core| core.close_session(Instant::now(), session, &reason));
}
