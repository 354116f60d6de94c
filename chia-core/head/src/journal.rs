//! The head core's side of the journal: which inputs change state (and so are kept), how a
//! head rebuilds its state from them after a restart, and how the peers of the previous run
//! take up their sessions again.
//!
//! The journal holds the core's *inputs*, not its state: the core is deterministic (its
//! counters assign the same ids, its loops do not follow hash-map order), so replaying the
//! kept inputs in order rebuilds exactly the state the previous run had — task records,
//! results, the scheduler's placements, services, job settings. Time is not kept: the only
//! decision that depends on it, writing off a silent worker, is kept as the session's close.
//! Frames the replay produces are dropped; those were sent before the crash, or their loss is
//! made up for when the peer resumes (a worker gets again the tasks it does not know, a driver
//! the outcomes it still waits for).
//!
//! After the replay every session of the previous run is *detached*: nothing is sent to it
//! (frames wait), its node is not written off by heartbeat, and it has the grace period
//! ([`CoreOptions::resume_grace`]) to come back with [`PeerToHead::Resume`]; a session still
//! away then is closed as if its peer had left.

use crate::core::{CoreOptions, HeadCore, Rejection, TaskKind};
use crate::outbox::Action;
use crate::persist::PersistedService;
use crate::scheduler::Event;
use crate::snapshot::SnapshotError;
use chia_core::protocol::{HeadToPeer, Outcome, PeerToHead, ResumeSession, ServiceStart, TaskAttempt};
use chia_core::{SessionId, TaskError, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Instant;

/// One input the head keeps, in the order it was handled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalEntry {
    /// A session opened with this hello and was given this id.
    Opened {
        /// The id it was given; a replay must give it the same.
        session: SessionId,
        /// Its first message, as received (a [`PeerToHead::Hello`]).
        hello: PeerToHead,
        /// The host the peer connected from (see [`HeadCore::open_session`]).
        #[serde(default)]
        host: Option<String>,
    },
    /// The `seq`-th message of a session (only messages that change state are kept).
    Message {
        /// The session it came from.
        session: SessionId,
        /// Its number among the session's messages, from 1 (kept or not).
        seq: u64,
        /// The message, as received.
        message: PeerToHead,
    },
    /// A session ended (its peer left, or the head wrote it off).
    Closed {
        /// The session that ended.
        session: SessionId,
        /// Why, as the head logged it (given again to [`HeadCore::close_session`] on replay).
        reason: String,
    },
    /// Detached services were started again from what the previous run kept.
    Restored {
        /// The services as given to [`HeadCore::restore_services`].
        services: Vec<PersistedService>,
    },
    /// A detached session was taken up again after a restart.
    Resumed {
        /// The session its peer took up.
        session: SessionId,
        /// A worker's: the runs it knew, with those sent in the frames held for it. What the
        /// head decided for the others (sent again, or failed) is decided again on replay.
        /// (`None` in journals written before it was kept.)
        #[serde(default)]
        known: Option<Vec<TaskAttempt>>,
        /// The starts decided again (see [`ResumeSession::starts`]), decided again on replay.
        #[serde(default)]
        starts: Vec<ServiceStart>,
    },
    /// The whole state after every entry before it (see [`HeadCore::snapshot`]): a journal
    /// compacted starts with one.
    Snapshot {
        /// The core's state, MessagePack with field names.
        state: serde_bytes::ByteBuf,
    },
    /// The head started again from the entries before it: every session of the previous run
    /// waits for its peer, and no new task is placed on its node until it is back.
    Restarted,
    /// A session taken up again lost its connection before its peer sent anything: it waits
    /// for it again (as `HeadCore::detach_again` decides).
    Detached {
        /// The session waiting again.
        session: SessionId,
    },
}

/// Whether handling `message` can change the head's state, so it must be kept. Queries
/// (fetch, lookup, ping) and liveness (heartbeats) need not be: a resumed peer sends again
/// whatever the head does not have.
pub fn changes_state(message: &PeerToHead) -> bool {
    !matches!(
        message,
        PeerToHead::Fetch { .. }
            | PeerToHead::Ping { .. }
            | PeerToHead::Heartbeat
            | PeerToHead::Figures(_)
            | PeerToHead::Inspect { .. }
            | PeerToHead::LookupService { .. }
            | PeerToHead::GroupReady { .. }
            | PeerToHead::Hello { .. }
            | PeerToHead::Resume(_)
    )
}

/// What a replay found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Entries applied.
    pub entries: usize,
    /// Sessions of the previous run now waiting for their peers.
    pub detached: usize,
    /// Task records recovered (queued, running, or holding a result).
    pub tasks: usize,
    /// The replay started from a snapshot.
    pub from_snapshot: bool,
}

impl HeadCore {
    /// A head rebuilt at `now` from the entries a previous run kept, in order. The sessions of
    /// that run wait for their peers until `now + options.resume_grace`; the previous run's
    /// own node (which died with it) is gone.
    pub fn recover(
        now: Instant,
        options: CoreOptions,
        entries: impl IntoIterator<Item = JournalEntry>,
    ) -> Result<(HeadCore, Recovery), SnapshotError> {
        let journal_id = options.journal_id;
        let replaying = CoreOptions { journal_id: None, ..options };
        let mut core = HeadCore::new(now, replaying.clone());
        let (mut applied, mut from_snapshot) = (0, false);
        for entry in entries {
            applied += 1;
            match entry {
                JournalEntry::Snapshot { state } => {
                    core = HeadCore::restore(now, replaying.clone(), &state)?;
                    from_snapshot = true;
                }
                JournalEntry::Opened { session, mut hello, host } => {
                    // Accepted when it was kept: a journal of an earlier protocol version still
                    // replays its sessions (their peers, of that version, cannot take them up).
                    if let PeerToHead::Hello { protocol_version, .. } = &mut hello {
                        *protocol_version = chia_core::protocol::PROTOCOL_VERSION;
                    }
                    // With its host, a worker replaces its predecessor as it did when it joined
                    // (the predecessor's `Closed` entry, after this one, finds it gone).
                    match core.open_session_from(now, "journal", host.as_deref(), hello) {
                        Ok(opened) if opened == session => {}
                        Ok(opened) => {
                            tracing::error!(
                                "journal: {session} was opened again as {opened}; the journal does not match this head"
                            )
                        }
                        Err(rejection) => {
                            tracing::error!("journal: {session} could not be opened again: {rejection}")
                        }
                    }
                }
                JournalEntry::Message { session, seq, message } => {
                    if let Some(peer) = core.sessions.get_mut(&session) {
                        // Messages that were not kept came in between: count them too.
                        peer.frames = seq.saturating_sub(1);
                    }
                    core.handle(now, session, message);
                }
                JournalEntry::Closed { session, reason } => core.close_session(now, session, &reason),
                JournalEntry::Restored { services } => core.restore_services(now, services),
                JournalEntry::Resumed { session, known, starts } => {
                    if let Some(peer) = core.sessions.get_mut(&session) {
                        peer.detached_until = None;
                    }
                    let known = known.map(|known| known.iter().map(|k| (k.task, k.attempt)).collect());
                    core.taken_up(session, known, starts);
                }
                JournalEntry::Restarted => core.pause_every_node(),
                JournalEntry::Detached { session } => core.pause_node_of(session),
            }
            // What the previous run sent was sent then.
            while core.outbox.pop().is_some() {}
        }
        core.options.journal_id = journal_id;
        core.recount();
        let deadline = now + core.options.resume_grace;
        // Until their workers are back, nothing new goes to their nodes: one that never comes
        // back would hold its tasks for the whole grace period. Paused first, so that what the
        // head's own node ran is not placed on them either.
        core.pause_every_node();
        if core.options.journal_id.is_some() {
            core.outbox.push(Action::Keep(JournalEntry::Restarted));
        }
        if let Some(own) = core.head_node.and_then(|node| core.nodes.get(&node).copied()) {
            // It ran in the process that died: what it hosted is lost (services restart from
            // their constructors, as after any node loss).
            core.head_died = true;
            core.close(own, "the head restarted");
            core.head_died = false;
        }
        let mut detached = 0;
        for session in core.sessions.values_mut() {
            session.detached_until = Some(deadline);
            detached += 1;
        }
        core.grace_until = (detached > 0).then_some(deadline);
        // Whatever the close above decided for the peers, all away now, waits for them in
        // their sessions (`poll_action` holds frames of detached sessions).
        let recovery = Recovery { entries: applied, detached, tasks: core.tasks.len(), from_snapshot };
        tracing::info!(
            "recovered {} journal entries: {} task(s), {} session(s) waiting to be taken up again",
            recovery.entries,
            recovery.tasks,
            recovery.detached
        );
        Ok((core, recovery))
    }

    /// A peer of the previous run takes up its session.
    pub(crate) fn resume(&mut self, resume: ResumeSession) -> Result<SessionId, Rejection> {
        let ResumeSession { session, journal_id, known, waiting, starts, .. } = resume;
        if self.options.journal_id != Some(journal_id) {
            return Err(Rejection {
                reason: format!(
                    "{session} belongs to another journal of the head (this one keeps {}); join afresh",
                    self.options.journal_id.map_or("no journal".to_string(), |id| format!("journal {id}"))
                ),
            });
        }
        let Some(peer) = self.sessions.get_mut(&session).filter(|s| s.detached_until.is_some()) else {
            return Err(Rejection {
                reason: format!(
                    "{session} cannot be taken up: it is not waiting for its peer (it ended, the grace period passed, or it is taken)"
                ),
            });
        };
        peer.resumed = peer.detached_until.take().map(|deadline| (deadline, peer.frames));
        let held = std::mem::take(&mut peer.held);
        let (name, node, frames) = (peer.name.clone(), peer.node, peer.frames);
        // What was decided while the session was away goes out now with the frames held for it:
        // runs sent there are not lost (nor to be sent again), outcomes announced there are not
        // to be announced twice.
        let mut known: HashSet<(TaskId, u32)> = known.iter().map(|k| (k.task, k.attempt)).collect();
        let mut announced = HashSet::new();
        for frame in &held {
            match frame.get(4..).map(chia_core::protocol::decode_body::<HeadToPeer>) {
                Some(Ok(HeadToPeer::Execute { task, attempt, .. })) => known.insert((task, attempt)),
                Some(Ok(HeadToPeer::StartInstance { task, .. } | HeadToPeer::CallInstance { task, .. })) => {
                    known.insert((task, 0))
                }
                Some(Ok(HeadToPeer::Done { task, .. })) => announced.insert(task),
                _ => false,
            };
        }
        let kept = node.map(|_| {
            let mut kept: Vec<TaskAttempt> =
                known.iter().map(|&(task, attempt)| TaskAttempt { task, attempt }).collect();
            kept.sort_unstable();
            kept
        });
        // Only starts still waited for, whose frame the head has, and that it has no trace of
        // (no record, no answer among the held frames), are decided again.
        let waited: HashSet<TaskId> = waiting.iter().copied().collect();
        let mut starts: Vec<ServiceStart> = starts
            .into_iter()
            .filter(|unanswered| (1..=frames).contains(&unanswered.frame))
            .map(|unanswered| unanswered.start)
            .filter(|start| {
                start.task.session() == session
                    && waited.contains(&start.task)
                    && !announced.contains(&start.task)
                    && !self.knows_start(session, start.task)
            })
            .collect();
        starts.sort_unstable_by_key(|start| start.task);
        starts.dedup_by_key(|start| start.task);
        self.outbox.push(Action::Keep(JournalEntry::Resumed {
            session,
            known: kept,
            starts: starts.clone(),
        }));
        tracing::info!("{name} ({session}) took up its session again");
        let welcome = self.welcome(session, node, &name, true, frames);
        self.outbox.send(session, &welcome);
        for frame in held {
            self.outbox.push(Action::Send { to: session, frame });
        }
        if let Some(node) = node {
            self.scheduler.handle(self.now, Event::NodeHeard { node });
        }
        let mut waiting = waiting;
        waiting.sort_unstable();
        waiting.dedup();
        waiting.retain(|task| !announced.contains(task));
        for task in waiting {
            // A placement group's creation is answered at once and leaves no task record.
            if task.session() == session
                && !self.tasks.contains_key(&task)
                && self.scheduler.group_status(chia_core::placement::GroupId(task)).is_some()
            {
                self.reply(session, task, Ok(&()));
                continue;
            }
            let Some(record) = self.tasks.get(&task).filter(|r| r.owner == session) else { continue };
            match (&record.kind, &record.outcome) {
                // One being written to a watching service is announced when the write ends.
                (_, Some(_)) if self.services.announce_waits(task) => {}
                (_, Some(_)) => self.announce(task),
                (TaskKind::ServiceStart(service), None) => {
                    let service = *service;
                    self.answer_start_again(session, task, service);
                }
                _ => {}
            }
        }
        for start in &starts {
            tracing::info!(
                "{name} ({session}) still waits for the answer to {}; deciding it again",
                start.task
            );
        }
        // What changes state, in the order a replay of the `Resumed` entry does it.
        self.taken_up(session, node.map(|_| known), starts);
        Ok(session)
    }

    /// The state a session's resume changes, live and on replay alike: runs the worker does
    /// not know are sent again (or end), starts are decided again, its node takes tasks again.
    fn taken_up(
        &mut self,
        session: SessionId,
        known: Option<HashSet<(TaskId, u32)>>,
        starts: Vec<ServiceStart>,
    ) {
        let node = self.sessions.get(&session).and_then(|peer| peer.node);
        if let (Some(node), Some(known)) = (node, known) {
            // What the worker still runs, it took up: its acknowledgement may have died with
            // the head.
            let mut running: Vec<TaskId> = known
                .iter()
                .filter(|&&(task, attempt)| {
                    self.tasks.get(&task).is_some_and(|r| r.running_on == Some(node) && r.attempt == attempt)
                })
                .map(|&(task, _)| task)
                .collect();
            running.sort_unstable();
            for task in running {
                self.feed(Event::TaskStarted { task, node });
            }
            self.resend_unknown(session, node, known);
        }
        for start in starts {
            self.start_service(session, start);
        }
        if let Some(node) = node {
            self.feed(Event::NodeResumed { node });
        }
    }

    /// After a restart: no node takes new tasks until its worker has taken up its session.
    fn pause_every_node(&mut self) {
        let mut nodes: Vec<chia_core::NodeId> = self.sessions.values().filter_map(|peer| peer.node).collect();
        nodes.sort_unstable();
        for node in nodes {
            self.feed(Event::NodePaused { node });
        }
    }

    fn pause_node_of(&mut self, session: SessionId) {
        if let Some(node) = self.sessions.get(&session).and_then(|peer| peer.node) {
            self.feed(Event::NodePaused { node });
        }
    }

    /// What the head had sent a resumed worker but the worker does not know (lost in flight
    /// when the head died) is sent again: tasks run, calls and instance starts that cannot be
    /// sent again (their arguments were handed over) fail.
    fn resend_unknown(&mut self, session: SessionId, node: chia_core::NodeId, known: HashSet<(TaskId, u32)>) {
        let mut unknown: Vec<TaskId> = self
            .tasks
            .iter()
            // One that ended already (a call failed by an earlier resume) is not run again.
            .filter(|(task, r)| {
                r.running_on == Some(node) && r.outcome.is_none() && !known.contains(&(**task, r.attempt))
            })
            .map(|(task, _)| *task)
            .collect();
        unknown.sort_unstable();
        for task in unknown {
            let Some(record) = self.tasks.get(&task) else { continue };
            match &record.kind {
                // Asked to stop (its owner left, or cancelled it): it ends here, as if the
                // worker had stopped it, instead of starting again.
                TaskKind::Function if self.scheduler.is_cancelled(task) => {
                    let (attempt, function) = (record.attempt, record.function.clone());
                    self.finished(session, task, attempt, Outcome::Failed(TaskError::Cancelled { function }));
                }
                TaskKind::Function => {
                    tracing::info!(
                        "{task} was lost on its way to {session} when the head stopped; sent again"
                    );
                    if let Err(e) = self.send_execute(task, session) {
                        tracing::error!("{task} could not be sent again: {e}");
                    }
                }
                TaskKind::ServiceCall { name, .. } => {
                    let error = TaskError::ServiceUnavailable {
                        service: name.clone(),
                        message: "the call was lost on its way to the service when the head restarted".into(),
                    };
                    self.fail_call(task, |_| error);
                }
                // A constructed instance lives on in the worker, which kept it through the
                // outage (it lists only runs whose outcome is not durable yet).
                TaskKind::ServiceStart(service) if self.instance_is_built(*service) => {
                    let service = *service;
                    self.repeat_stop(session, service);
                }
                TaskKind::ServiceStart(service) => {
                    let service = *service;
                    let node = self.session_name(session).unwrap_or_default().to_string();
                    let error = TaskError::WorkerLost {
                        function: record.function.clone(),
                        lost_on: vec![node.clone()],
                        node,
                        attempts: 1,
                    };
                    self.instance_task_failed(task, service, error);
                }
            }
        }
    }

    /// The connection of a session taken up again ended before the peer sent anything on it
    /// (the welcome did not reach it, say): the session waits for the peer again, for what
    /// is left of the grace period, so that the peer's next try is not refused. True if so.
    pub(crate) fn detach_again(&mut self, now: Instant, session: SessionId) -> bool {
        let Some(peer) = self.sessions.get_mut(&session) else { return false };
        match peer.resumed {
            Some((deadline, frames)) if now < deadline && peer.frames == frames => {
                tracing::info!(
                    "{} ({session}) lost its connection right after taking up its session; it may try again",
                    peer.name
                );
                peer.detached_until = Some(deadline);
                self.congested.remove(&session);
                self.pause_node_of(session);
                if self.options.journal_id.is_some() {
                    self.outbox.push(Action::Keep(JournalEntry::Detached { session }));
                }
                true
            }
            _ => false,
        }
    }

    /// Sessions whose peers did not come back in time are closed, as if they had left.
    pub(crate) fn end_expired_graces(&mut self, now: Instant) {
        if self.grace_until.is_none_or(|deadline| now < deadline) {
            return;
        }
        // Every session of the previous run shares this deadline: one look after it is enough.
        self.grace_until = None;
        let mut expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.detached_until.is_some_and(|deadline| deadline <= now))
            .map(|(session, _)| *session)
            .collect();
        expired.sort_unstable();
        for session in expired {
            let grace = self.options.resume_grace;
            self.close(session, &format!("did not come back within {grace:?} of the head's restart"));
        }
    }
}
