//! Typed ids. Each is a `u64` underneath, but they cannot be mixed up.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "-{}"), self.0)
            }
        }
    };
}

typed_id!(
    /// One connection to the head (a driver, or a worker's client side). Assigned by the head.
    SessionId,
    "session"
);
typed_id!(
    /// A node that runs tasks. Assigned by the head when a worker joins; a worker that
    /// reconnects is a new node.
    NodeId,
    "node"
);

typed_id!(
    /// A running service instance. Assigned by the head when the service is started.
    ServiceId,
    "service"
);

/// A task, and the object its result becomes. Chosen by the submitting session without a
/// round trip: the high 24 bits are the session, the low 40 bits a per-session counter.
/// (`Debug` prints it as `Display` does, `task-3.7`: in logs and traces the packed number
/// would name nothing.)
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub u64);

impl TaskId {
    const SEQ_BITS: u32 = 40;

    /// The `seq`-th task of `session`.
    ///
    /// ```
    /// use chia_core::{SessionId, TaskId};
    /// let id = TaskId::new(SessionId(3), 7);
    /// assert_eq!(id.session(), SessionId(3));
    /// assert_eq!(id.seq(), 7);
    /// ```
    pub fn new(session: SessionId, seq: u64) -> TaskId {
        TaskId((session.0 << Self::SEQ_BITS) | (seq & ((1 << Self::SEQ_BITS) - 1)))
    }

    /// The session that submitted the task.
    pub fn session(self) -> SessionId {
        SessionId(self.0 >> Self::SEQ_BITS)
    }

    /// The per-session sequence number.
    pub fn seq(self) -> u64 {
        self.0 & ((1 << Self::SEQ_BITS) - 1)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Reads `task-3.7` (as displayed) or `3.7`.
impl std::str::FromStr for TaskId {
    type Err = String;

    fn from_str(text: &str) -> Result<TaskId, String> {
        let bad = || format!("{text:?} is not a task id (they look like task-3.7: session 3, task 7)");
        let (session, seq) = text.strip_prefix("task-").unwrap_or(text).split_once('.').ok_or_else(bad)?;
        let session: u64 = session.parse().map_err(|_| bad())?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        if session >= 1 << (64 - TaskId::SEQ_BITS) || seq >= 1 << TaskId::SEQ_BITS {
            return Err(bad());
        }
        Ok(TaskId::new(SessionId(session), seq))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task-{}.{}", self.session().0, self.seq())
    }
}
