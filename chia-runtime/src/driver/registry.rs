//! The functions linked into this binary, collected at link time by `#[chia::function]`.
//!
//! Each use of the attribute macro submits one [`FunctionSpec`] with `inventory`; a worker
//! announces all of them when it joins, and runs them by name.

use crate::driver::context::Context;
use crate::driver::hooks::{Attempt, Ended};
pub use crate::util::panic_message;
use chia_core::protocol::{ArgValue, Value};
use chia_core::{FunctionKey, ResourceAmount, Resources, TaskError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

/// A boxed, sendable future (what an async function's invoker returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How the worker runs a function: sync functions on the blocking pool, async ones as tasks.
#[derive(Clone, Copy)]
pub enum Invoke {
    /// A plain `fn`: called on tokio's blocking pool, so it may block for as long as it runs.
    Sync(fn(Context, Vec<ArgValue>) -> Result<Value, TaskError>),
    /// An `async fn`: its future is spawned on the worker's runtime and must not block.
    Async(fn(Context, Vec<ArgValue>) -> BoxFuture<Result<Value, TaskError>>),
}

/// Everything the macro knows about one remote function. Amounts are fixed point (1.0 = 10,000),
/// already validated at compile time.
pub struct FunctionSpec {
    /// The stable name calls are sent under: `name = ".."` of the attribute, else the
    /// function's identifier. Unique within a binary.
    pub name: &'static str,
    /// The normalised signature text the hash is computed from, e.g. `add(i64,i64)->i64`.
    pub signature: &'static str,
    /// The first 16 hex digits of the SHA-256 of `signature`: a worker runs a call only if its
    /// own build of the function has the same hash, so arguments are never decoded as
    /// something else.
    pub sig_hash: &'static str,
    /// The `resources(..)` of the attribute, by name, in fixed point (1.0 = 10,000). The CPU
    /// request is `num_cpus`, not an entry here.
    pub resources: &'static [(&'static str, u64)],
    /// The CPUs one call requests, in fixed point (default 1.0 = 10,000).
    pub num_cpus: u64,
    /// How often a call runs again after its worker is lost (and, with `retry_exceptions`,
    /// after an `Err` or a timeout); default `UpTo(3)`.
    pub max_retries: chia_core::Retries,
    /// Application errors (an `Err`) and timeouts also make the call run again.
    pub retry_exceptions: bool,
    /// How long one run may take (`timeout_s`, exact to the millisecond, more than 0) before
    /// its worker stops it and it fails with `TimedOut`; `None`: no limit.
    pub timeout: Option<std::time::Duration>,
    /// The arguments a call must carry (the `Context` parameter, if any, not counted).
    pub arg_count: usize,
    /// Decodes the arguments, calls the function and encodes its result.
    pub invoke: Invoke,
    /// Runs on the worker before every attempt (`setup = path`); see [`hooks`](crate::hooks).
    pub setup: Option<SetupHook>,
    /// Runs on the worker after every attempt whose setup succeeded (`cleanup = path`).
    pub cleanup: Option<CleanupHook>,
}

inventory::collect!(FunctionSpec);

/// A setup hook as the macro wraps it: its name, for errors and logs, and how to run it.
#[derive(Clone, Copy)]
pub struct SetupHook {
    /// The path as written in the attribute, e.g. `prepare_tools` or `tools::prepare`.
    pub name: &'static str,
    /// Runs the hook; `Err` carries the hook's error text.
    pub run: fn(Attempt) -> BoxFuture<Result<(), String>>,
}

/// A cleanup hook as the macro wraps it.
#[derive(Clone, Copy)]
pub struct CleanupHook {
    /// The path as written in the attribute.
    pub name: &'static str,
    /// Runs the hook; `Err` carries the hook's error text.
    pub run: fn(Attempt, Ended) -> BoxFuture<Result<(), String>>,
}

impl FunctionSpec {
    /// The key under which workers offer this function and calls name it: `name` and
    /// `sig_hash`.
    pub fn key(&self) -> FunctionKey {
        FunctionKey::new(self.name, self.sig_hash)
    }

    /// The default request of a call: the declared resources plus `CPU = num_cpus`.
    pub fn request(&self) -> Resources {
        let mut request = Resources::new();
        for (name, fixed) in self.resources {
            // Names were validated by the macro; a name the runtime still rejects is skipped
            // rather than aborting a call, and the registry check below reports it at start.
            let _ = request.set(name, ResourceAmount::from_fixed(*fixed));
        }
        let _ = request.set(chia_core::resources::CPU, ResourceAmount::from_fixed(self.num_cpus));
        request
    }
}

/// All functions linked into this binary, by name.
pub fn functions() -> &'static HashMap<&'static str, &'static FunctionSpec> {
    static ALL: OnceLock<HashMap<&'static str, &'static FunctionSpec>> = OnceLock::new();
    ALL.get_or_init(|| {
        by_name("remote functions", inventory::iter::<FunctionSpec>.into_iter().map(|spec| (spec.name, spec)))
    })
}

/// The registrations of one kind (`what`) by name. Two of one name are a mistake the linker
/// cannot see (two crates, or two `name = ".."` alike): logged, and the later one kept.
pub(crate) fn by_name<T>(
    what: &str,
    specs: impl Iterator<Item = (&'static str, T)>,
) -> HashMap<&'static str, T> {
    let mut all = HashMap::new();
    for (name, spec) in specs {
        if all.insert(name, spec).is_some() {
            tracing::error!(
                "two {what} are registered as {name:?}; the second wins — give one a `name = \"...\"`"
            );
        }
    }
    all
}

/// Decodes argument `index` of `function` (called by macro-generated code).
/// Service handles in it bind to `cx`, the context the call runs with.
pub fn decode_arg<T: DeserializeOwned>(
    cx: &Context,
    function: &str,
    index: usize,
    arg: &ArgValue,
) -> Result<T, TaskError> {
    crate::driver::context::decode_in(cx, &arg.0).map_err(|e| TaskError::BadArgument {
        function: function.to_string(),
        index,
        message: e.to_string(),
    })
}

/// Encodes a function's result (called by macro-generated code).
pub fn encode_result<T: Serialize>(function: &str, value: &T) -> Result<Value, TaskError> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| TaskError::BadResult { function: function.to_string(), message: e.to_string() })
}

/// Turns a function's `Err` into the task's error, keeping the whole `Display` chain.
pub fn application_error(function: &str, error: &dyn std::fmt::Display) -> TaskError {
    TaskError::Application { function: function.to_string(), message: format!("{error:#}") }
}

/// Checks the argument count before decoding (called by macro-generated code).
pub fn check_arg_count(function: &str, expected: usize, args: &[ArgValue]) -> Result<(), TaskError> {
    if args.len() == expected {
        Ok(())
    } else {
        Err(TaskError::ArgumentCount { function: function.to_string(), expected, found: args.len() })
    }
}

/// A service instance as the host keeps it.
pub type ServiceInstance = Box<dyn std::any::Any + Send>;

/// An instance shared by its calls; the mutex makes calls run one at a time.
pub type SharedInstance = std::sync::Arc<tokio::sync::Mutex<ServiceInstance>>;

/// Everything `#[chia::service]` knows about one service type.
pub struct ServiceSpec {
    /// The stable name instances are started under: `name = ".."` of the attribute, else the
    /// type's identifier.
    pub type_name: &'static str,
    /// The normalised constructor and method signatures the hash is computed from.
    pub signature: &'static str,
    /// The first 16 hex digits of the SHA-256 of `signature`: a node hosts an instance only if
    /// its own build of the type has the same hash.
    pub sig_hash: &'static str,
    /// Runs the constructor on the hosting worker when an instance starts.
    pub construct: ConstructInstance,
    /// Runs one method call on a started instance.
    pub call: CallInstance,
    /// Calls run at the same time (`#[chia::service(concurrent)]`) rather than one at a time
    /// in arrival order.
    pub concurrent: bool,
}

/// Builds an instance from the constructor's arguments.
pub type ConstructInstance = fn(Context, Vec<ArgValue>) -> BoxFuture<Result<ServiceInstance, TaskError>>;

/// Runs the method named by the `String` on an instance.
pub type CallInstance =
    fn(SharedInstance, Context, String, Vec<ArgValue>) -> BoxFuture<Result<Value, TaskError>>;

inventory::collect!(ServiceSpec);

impl ServiceSpec {
    /// The key under which nodes offer this type and the scheduler places its instances.
    pub fn key(&self) -> FunctionKey {
        FunctionKey::new(self.type_name, self.sig_hash)
    }
}

/// All service types linked into this binary, by type name.
pub fn services() -> &'static HashMap<&'static str, &'static ServiceSpec> {
    static ALL: OnceLock<HashMap<&'static str, &'static ServiceSpec>> = OnceLock::new();
    ALL.get_or_init(|| {
        by_name(
            "service types",
            inventory::iter::<ServiceSpec>.into_iter().map(|spec| (spec.type_name, spec)),
        )
    })
}

/// Runs a sync service method on the blocking pool (called by macro-generated code), so a slow
/// method does not stall the async runtime. A panic becomes a `Panic` error; the host fills in
/// the method's name.
pub async fn run_blocking(
    call: impl FnOnce() -> Result<Value, TaskError> + Send + 'static,
) -> Result<Value, TaskError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => {
            Err(TaskError::Panic { function: String::new(), message: panic_message(join_error.into_panic()) })
        }
        Err(join_error) => Err(TaskError::Panic { function: String::new(), message: join_error.to_string() }),
    }
}
