//! One connection to the cluster and what user code does over it, on a driver and inside a
//! task alike: the [`client`] (pending results by task), the [`context`] user code holds
//! (`Context`, `ObjectRef`, `get`, `wait`), the `job` a context's calls belong to, the
//! [`process`] state of a running task, the [`placement`] groups calls run in, the [`figures`]
//! hosted service instances report, the [`hooks`] around a function's attempts, and
//! the [`registry`] of functions and service types linked into the binary. Built on
//! [`crate::net`]; knows nothing of the head or the worker.

pub mod client;
pub mod contain;
pub mod context;
pub mod figures;
pub mod hooks;
pub mod inspect;
pub(crate) mod job;
pub mod placement;
pub mod process;
pub mod registry;
