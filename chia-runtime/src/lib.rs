//! `chia-runtime` owns everything that moves: the head scheduler, the worker agent, the driver
//! client and the QUIC transport, and the user API built on them.
//!
//! Users depend on it under the name `chia`:
//! `chia = { package = "chia-runtime", ... }`, define functions with
//! [`#[chia::function]`](macro@function), connect with [`init`], and call them remotely:
//!
//! ```
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
//! a function (`bypass:`) is [`mod@bypass`]; settings shared while a loop runs, the
//! cluster's key/value store, are [`mod@kv`].
//!
//! The I/O-free parts live in `chia-head-core` (the head's state machine, the scheduler
//! included) and in `chia-core` (ids, resources, wire protocol).
//!
//! # Layers
//!
//! Each layer uses only the ones below it (`tests/layers.rs` checks this), so the head never
//! depends on the worker, and a connection never on what runs over it:
//!
//! | layer | modules | uses |
//! |---|---|---|
//! | 6 | `local` (`init`, the embedded cluster, `HeadWithNode`) | head, worker, driver, net |
//! | 5 | `call` ([`Call`]: deciding bypass at dispatch) · `worker/` (the agent, its command line) | services, driver, net |
//! | 4 | `services/` (`service`, `cache`, `bypass/`) | driver |
//! | 3 | `head/` (the head's driver around `chia-head-core`) · `driver/` (`client`, `context`, `job`, `contain`, `process`, `registry`) | net |
//! | 2 | `net/` (`transport`, `tls`) | — |
//! | 1 | `util` (catching panics, blocking on a future) · `env` (`CHIA_*` variables) | error |
//! | 0 | `error` | — |
//!
//! # What is public
//!
//! Only what users call: the items at the top of the crate and the modules [`mod@service`],
//! [`mod@cache`], [`mod@bypass`], [`mod@kv`], [`mod@hooks`], [`mod@inspect`] and
//! [`mod@figures`]. The modules above are private; the head, the scheduler, the transport,
//! credentials and the wire protocol are reached by chia's own binaries, benchmark and tests
//! through `chia::internals`, which is hidden and may change in any release
//! (`tests/ui/internals_*.rs` check that the rest stays unreachable).

// The attribute macros name the runtime `::chia`; inside this crate that is the crate itself.
extern crate self as chia;

mod call;
mod driver;
mod env;
mod error;
mod head;
mod local;
mod net;
mod services;
mod util;
mod worker;

pub use call::Call;
pub use driver::context::{Context, IntoArg, ObjectRef, get, wait};
pub use driver::process::CANCEL_GRACE;
pub use driver::{figures, hooks, inspect, placement};
pub use services::{bypass, cache, kv, service};

pub use chia_core::protocol::ServiceInfo;
pub use chia_core::{NodeId, ResourceAmount, Resources, Retries, ServiceId, SessionId, TaskError, TaskId};
pub use chia_macros::{condition, function, provider, service};
pub use error::{Error, HeadStartError, JoinError};
pub use local::{Init, LocalCluster, init};
/// A byte buffer that serializes as one binary blob: use it (not `Vec<u8>`, which serde
/// encodes element by element) for large binary arguments and results.
pub use serde_bytes::ByteBuf as Bytes;
pub use service::{ServiceHandle, ServiceOptions, lookup_info, stop_service};
pub use worker::main::{init_logging, run_main, worker_main};

/// What chia's own binaries (`chia-head`, `chia`), benchmark and tests build on: the head,
/// in-process nodes, connections with explicit credentials, the wire protocol. Not part of the
/// user API; it changes without notice.
#[doc(hidden)]
pub mod internals {
    pub use crate::driver::client::Client;
    pub use crate::env::default_state_dir;
    /// The `CHIA_*` environment variables.
    pub mod env {
        pub use crate::env::*;
    }
    pub use crate::head::{HeadHandle, HeadOptions, HeadStats};
    pub use crate::local::HeadWithNode;
    pub use crate::net::{members, tls, transport};
    pub use crate::worker::{NodeOffer, Worker};
    pub use chia_core as core;
    pub use chia_core::protocol;
    pub use chia_head_core::scheduler;
}

/// Used by the code `#[chia::function]` generates; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::driver::context::ArgInput;
    pub use crate::driver::registry::{
        BoxFuture, FunctionSpec, Invoke, ServiceInstance, ServiceSpec, SharedInstance, application_error,
        check_arg_count, decode_arg, encode_result, run_blocking,
    };
    pub use crate::util::run_sync;
    pub use chia_core::TaskError;
    pub use chia_core::protocol::{ArgValue, Value};

    /// A call of the function `spec` with these arguments (what `f::call(..)` builds).
    pub fn new_call<T: serde::de::DeserializeOwned>(
        spec: &'static FunctionSpec,
        args: Vec<ArgInput>,
    ) -> crate::Call<T> {
        crate::Call::new(spec, args)
    }
    pub use inventory;
    pub use serde;
    /// What a `setup =` / `cleanup =` hook's wrapper needs.
    pub mod hooks {
        pub use crate::driver::hooks::wrap::{
            AsFuture, AsValue, AsyncHook, HookReturn, NotAHook, Returned, SyncHook,
        };
        pub use crate::driver::registry::{CleanupHook, SetupHook};
    }
}
