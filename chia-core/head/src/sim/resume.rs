//! A peer's side of taking up its session after a head restart, as the real client does it
//! (`chia-runtime/src/driver/client.rs`, `Link`): every frame sent after the hello is
//! numbered, state-changing ones are kept until the head says they are durable, and after a
//! resume what the head did not keep is sent again, numbered from what it has.

use crate::journal::changes_state;
use chia_core::TaskId;
use chia_core::protocol::{PeerToHead, TaskAttempt};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// The journal the welcome named: the session can be taken up after a head restart.
    pub(crate) journal_id: Option<u64>,
    /// False while the head is away: state-changing frames wait unnumbered, others are dropped.
    pub(crate) down: bool,
    /// A `Resume` was sent and its answer is awaited.
    pub(crate) resuming: bool,
    /// Frames sent on the session (after the hello).
    pub(crate) sent: u64,
    /// State-changing frames the head has not said are durable: `(seq, frame)`, 0 while down.
    pub(crate) unacked: VecDeque<(u64, PeerToHead)>,
    /// Runs the head gave this worker whose outcome is not durable yet.
    pub(crate) leases: BTreeSet<TaskAttempt>,
    /// The highest `Durable { through }` heard.
    pub(crate) durable_through: u64,
    /// The frame number of each service start (0 while it waits unnumbered), for the
    /// `Resume`'s starts.
    pub(crate) start_frames: BTreeMap<TaskId, u64>,
}

impl Tracker {
    /// A frame the peer sends: what goes on the wire now, if anything.
    pub(crate) fn outgoing(&mut self, message: PeerToHead) -> Option<PeerToHead> {
        let keep = self.journal_id.is_some() && changes_state(&message);
        if let (true, PeerToHead::StartService(start)) = (keep, &message) {
            self.start_frames.insert(start.task, if self.down { 0 } else { self.sent + 1 });
        }
        if self.down {
            if keep {
                self.unacked.push_back((0, message));
            }
            return None;
        }
        self.sent += 1;
        if keep {
            self.unacked.push_back((self.sent, message.clone()));
        }
        Some(message)
    }

    pub(crate) fn leased(&mut self, lease: TaskAttempt) {
        if self.journal_id.is_some() {
            self.leases.insert(lease);
        }
    }

    /// The head keeps the session's frames up to `through`.
    pub(crate) fn durable(&mut self, through: u64) {
        self.durable_through = self.durable_through.max(through);
        while self.unacked.front().is_some_and(|(seq, _)| *seq != 0 && *seq <= through) {
            if let Some((_, PeerToHead::Finished { task, attempt, .. })) = self.unacked.pop_front() {
                self.leases.remove(&TaskAttempt { task, attempt });
            }
        }
    }

    /// The connection is lost: frames wait until the session is taken up again.
    pub(crate) fn lost(&mut self) {
        self.down = true;
        self.resuming = false;
    }

    /// The restarted head has the session's frames up to `through`: what to send again.
    pub(crate) fn resumed(&mut self, through: u64) -> Vec<PeerToHead> {
        self.durable(through);
        self.sent = through;
        self.down = false;
        self.resuming = false;
        let mut again = Vec::with_capacity(self.unacked.len());
        for (seq, message) in &mut self.unacked {
            self.sent += 1;
            *seq = self.sent;
            if let PeerToHead::StartService(start) = message {
                self.start_frames.insert(start.task, self.sent);
            }
            again.push(message.clone());
        }
        again
    }

    pub(crate) fn known(&self) -> Vec<TaskAttempt> {
        self.leases.iter().copied().collect()
    }
}
