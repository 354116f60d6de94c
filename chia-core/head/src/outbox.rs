//! What the head core asks its driver to do: a queue of [`Action`]s, in the order decided.

use crate::persist::PersistedService;
use chia_core::SessionId;
use chia_core::protocol::{CloseCode, ProtocolError, encode_frame};
use serde::Serialize;
use std::collections::VecDeque;

/// One thing the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this frame (length prefix included, a `HeadToPeer` message) on the session's
    /// control stream.
    Send {
        /// The session to send it to.
        to: SessionId,
        /// The encoded frame, within [`chia_core::protocol::MAX_FRAME_BYTES`].
        frame: Vec<u8>,
    },
    /// Close the session's connection with `code` and `reason`; the core has forgotten it
    /// already.
    Close {
        /// The session whose connection to close.
        session: SessionId,
        /// Why, in words (sent as the QUIC close reason).
        reason: String,
        /// The application close code, so the peer knows whether to join again.
        code: CloseCode,
    },
    /// The detached services to start again after a restart are now these (all of them).
    SaveServices(Vec<PersistedService>),
    /// Append this to the journal (only when the head keeps one). What follows it in the
    /// outbox was decided because of it: a frame must not leave before its cause is durable.
    Keep(crate::journal::JournalEntry),
    /// Hand `call` to the instance on the head's own node, which runs in the head's process
    /// (only with [`CoreOptions::own_node_in_process`](crate::CoreOptions)): no frame, no
    /// connection. Its outcome comes back as `PeerToHead::Finished { task, attempt: 0, .. }`
    /// from `session`, the own node's, as if it had been sent. A driver that cannot hand it
    /// over sends [`OwnNodeCall::frame`] to `session` instead.
    CallOwnNode {
        /// The own node's session.
        session: SessionId,
        /// The call.
        call: OwnNodeCall,
    },
}

/// A service call for an instance on the head's own node ([`Action::CallOwnNode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnNodeCall {
    /// The call's task.
    pub task: chia_core::TaskId,
    /// The instance.
    pub service: chia_core::ServiceId,
    /// The method.
    pub method: String,
    /// Its arguments, each an encoded value.
    pub args: Vec<chia_core::protocol::ArgValue>,
}

impl OwnNodeCall {
    /// The call as the `HeadToPeer::CallInstance` frame the node would be sent over its
    /// connection.
    pub fn frame(&self) -> Result<Vec<u8>, ProtocolError> {
        let args: Vec<chia_core::protocol::ValueRef<'_>> =
            self.args.iter().map(|arg| chia_core::protocol::ValueRef(&arg.0)).collect();
        let message = chia_core::protocol::HeadToPeerRef::CallInstance {
            task: self.task,
            service: self.service,
            method: &self.method,
            args,
        };
        let mut frame = Vec::with_capacity(128);
        encode_frame(&message, &mut frame)?;
        Ok(frame)
    }
}

impl Action {
    /// The message of a [`Action::Send`], decoded (for tests and the simulator).
    pub fn decoded(&self) -> Option<(SessionId, chia_core::protocol::HeadToPeer)> {
        match self {
            Action::Send { to, frame } => {
                Some((*to, chia_core::protocol::decode_body(frame.get(4..)?).ok()?))
            }
            _ => None,
        }
    }
}

#[derive(Default)]
pub(crate) struct Outbox {
    actions: VecDeque<Action>,
}

impl Outbox {
    /// Queues `message` for `to`. A message that cannot be encoded (only one carrying a value
    /// can be too large) is an error the caller handles.
    pub(crate) fn send_checked<M: Serialize>(
        &mut self,
        to: SessionId,
        message: &M,
    ) -> Result<(), ProtocolError> {
        let mut frame = Vec::with_capacity(128);
        encode_frame(message, &mut frame)?;
        self.actions.push_back(Action::Send { to, frame });
        Ok(())
    }

    /// Queues a message that carries no value, so it always encodes.
    pub(crate) fn send<M: Serialize>(&mut self, to: SessionId, message: &M) {
        if let Err(e) = self.send_checked(to, message) {
            tracing::error!("could not encode a message to {to}: {e}");
        }
    }

    pub(crate) fn close(&mut self, session: SessionId, reason: &str, code: CloseCode) {
        self.actions.push_back(Action::Close { session, reason: reason.to_string(), code });
    }

    pub(crate) fn push(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    pub(crate) fn pop(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}
