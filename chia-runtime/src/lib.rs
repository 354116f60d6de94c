//! `chia-runtime` owns everything that moves: the head scheduler, the worker agent, the driver
//! client and the QUIC transport, and the user API built on them.
//!
//! Users depend on it under the name `chia`:
//! `chia = { package = "chia-runtime", ... }`, define functions with
//! [`#[chia::function]`](macro@function), connect with [`init`], and call them remotely:
//!
//! ```no_run
//! # extern crate chia_runtime as chia;
//! #[chia::function(resources(adder = 1))]
//! fn simple_add(x: i64, y: i64) -> i64 {
//!     x + y
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), chia::Error> {
//!     // An embedded local cluster (2 workers with an adder each) unless CHIA_ADDRESS is set.
//!     let cx = chia::Init::new().local_resources("adder=1").connect().await?;
//!     let sum = simple_add::call(1, 2).tag("iter0").remote(&cx);
//!     let doubled = simple_add::remote(&cx, &sum, &sum); // chained: runs when `sum` is ready
//!     assert_eq!(doubled.get().await?, 6);
//!     Ok(())
//! }
//! ```
//!
//! Stateful services (`#[chia::service]` on an `impl` block, started with [`ServiceOptions`]
//! and resolved by name through the head) are described in [`mod@service`].
//! The result cache is [`mod@cache`]; replaying recorded or cached results instead of running
//! a function (`bypass:`) is [`mod@bypass`].
//!
//! The I/O-free parts live in `chia-head-core` (the head's state machine, [`scheduler`]
//! included) and in `chia-core` (ids, resources, wire protocol).
//!
//! # Layers
//!
//! Each layer uses only the ones below it (`tests/layers.rs` checks this), so the head never
//! depends on the worker, and a connection never on what runs over it:
//!
//! | layer | modules | uses |
//! |---|---|---|
//! | 6 | `local` (`init`, the embedded cluster, [`HeadWithNode`]) | head, worker, driver, net |
//! | 5 | `call` ([`Call`]: deciding bypass at dispatch) · `worker/` (the agent, its command line) | services, driver, net |
//! | 4 | `services/` (`service`, `cache`, `bypass/`) | driver |
//! | 3 | `head/` (the head's driver around `chia-head-core`) · `driver/` (`client`, `context`, `job`, `contain`, `process`, `registry`) | net |
//! | 2 | `net/` (`transport`, `tls`) | — |
//! | 1 | `util` (catching panics, blocking on a future) · `env` (`CHIA_*` variables) | error |
//! | 0 | `error` | — |
//!
//! The public paths (`chia::api`, `chia::cache`, `chia::worker`, ...) are the re-exports below.

// The attribute macros name the runtime `::chia`; inside this crate that is the crate itself.
extern crate self as chia;

mod call;
pub mod driver;
pub mod env;
pub mod error;
pub mod head;
pub mod local;
pub mod net;
pub mod services;
mod util;
pub mod worker;

/// The user API: [`Context`], typed [`ObjectRef`]s, [`Call`] builders, [`get`] and [`wait`].
pub mod api {
    pub use crate::call::Call;
    pub use crate::driver::context::{ArgInput, Context, IntoArg, ObjectRef, get, wait};
}
/// The head's placement state machine (re-exported from `chia-head-core`).
pub use chia_head_core::scheduler;
pub use driver::{client, contain, inspect, placement, process, registry};
pub use net::{members, tls, transport};
pub use services::{bypass, cache, service};

pub use api::{ArgInput, Call, Context, IntoArg, ObjectRef, get, wait};
/// The plain data types (ids, resources, wire protocol) this runtime is built on.
pub use chia_core as core;
pub use chia_core::protocol::ServiceInfo;
pub use chia_core::{ResourceAmount, Resources, TaskError, TaskId};
pub use chia_macros::{condition, function, provider, service};
pub use error::Error;
pub use local::{HeadWithNode, Init, LocalCluster, init};
/// A byte buffer that serializes as one binary blob: use it (not `Vec<u8>`, which serde
/// encodes element by element) for large binary arguments and results.
pub use serde_bytes::ByteBuf as Bytes;
pub use service::{ServiceHandle, ServiceOptions, lookup_info, stop_service};
pub use worker::main::{init_logging, run_main, worker_main};

/// Used by the code `#[chia::function]` generates; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::driver::registry::{
        BoxFuture, FunctionSpec, Invoke, ServiceInstance, ServiceSpec, SharedInstance, application_error,
        check_arg_count, decode_arg, encode_result, run_blocking,
    };
    pub use chia_core::TaskError;
    pub use chia_core::protocol::{ArgValue, Value};
    pub use inventory;
}
