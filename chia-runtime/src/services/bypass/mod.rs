//! Bypass at run time: replacing a call's computation with a provider while the call is still
//! dispatched with its function's resources, as configured by the `bypass:` YAML section.
//!
//! - The **caller** decides ([`Call::remote`](crate::Call::remote)): the function is
//!   `bypass: true`, it has a provider or a `data:` file, its tag matches the `tags:` (if any),
//!   and the registered condition (if any) returns true, in that order. The decision travels
//!   with the submission.
//! - The **worker** chosen for the call runs the named provider instead of the function (or,
//!   without one, returns the `data:` file's text, read on the head through the file server).
//! - The configuration belongs to the **job**: [`Bypass`] installs it on the driver's context,
//!   the head ships it with every task of the job, and calls made inside those tasks decide
//!   exactly as the driver does. Only a driver creates one: inside a task, a service, or on a
//!   worker's own connection it is refused ([`Error::BypassOutsideDriver`]), so no job's plan
//!   reaches another job's tasks.
//!
//! Rust cannot send closures to other machines, so providers and conditions are functions
//! registered by name with [`#[chia::provider]`](macro@crate::provider) and
//! [`#[chia::condition]`](macro@crate::condition); every binary that may run them (workers for
//! providers, callers for conditions) links them, as it links the remote functions.
//!
//! ```
//! # extern crate chia_runtime as chia;
//! use chia::bypass::{Bypass, BypassCall};
//!
//! #[chia::function(resources(adder = 1))]
//! fn simple_add(x: i64, y: i64) -> i64 {
//!     x + y
//! }
//!
//! /// Answers every bypassed call with 42, on the worker the real call would have used.
//! #[chia::provider]
//! fn provider_42(_call: &BypassCall) -> i64 {
//!     42
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let yaml = dir.path().join("loop.yaml");
//! # std::fs::write(&yaml, "bypass:\n  simple_add: true\n")?;
//! let cx = chia::Init::new().local_resources("adder=1").connect().await?;
//! let bypass = Bypass::load(&cx, Some(&yaml)).await?; // loop.yaml: `bypass: {simple_add: true}`
//! bypass.set_provider("simple_add", &provider_42::PROVIDER)?;
//! assert_eq!(simple_add::remote(&cx, 1, 2).get().await?, 42);
//! # Ok(()) }
//! ```
//!
//! With no YAML (`Bypass::load(cx, None)`), nothing is installed and dispatch does not look
//! at bypass at all.

mod files;
mod replay;

/// The `bypass:` section as read ([`BypassConfig`], one [`BypassRule`] per function, tags as
/// [`TagPatterns`]), the plan calls follow ([`BypassPlan`], whose [`Verdict`] is the decision
/// before any condition), how a call was dispatched ([`Decision`], [`RunReason`]), and why a
/// section could not be loaded ([`SectionError`]).
pub use chia_bypass::{
    BypassConfig, BypassPlan, BypassRule, Decision, RunReason, SectionError, TagPatterns, Verdict,
};
pub use files::{BypassFiles, BypassFilesHandle};

use crate::driver::context::{ArgInput, ArgKind, Context, ObjectRef};
use crate::driver::job::{JobLink, OwnJob};
use crate::driver::registry::by_name;
use crate::error::Error;
use crate::services::service::ServiceOptions;
use crate::util::{CatchUnwind, block_on, panic_message};
use chia_core::protocol::{ArgValue, BypassSpec, JobSettings, Outcome, PeerToHead, Value};
use chia_core::{SessionId, TaskError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

/// A boxed, sendable future borrowing from its caller (what providers and conditions return).
pub type BoxFutureRef<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A provider registered with `#[chia::provider]`: `run` returns the serialized value or the
/// error's text.
pub struct ProviderSpec {
    /// The name a bypass plan refers to it by: `name = ".."` of the attribute, else the
    /// function's identifier.
    pub name: &'static str,
    /// Runs the provider on the worker chosen for the bypassed call.
    pub run: for<'a> fn(&'a BypassCall) -> BoxFutureRef<'a, Result<Value, String>>,
}

/// A condition registered with `#[chia::condition]`.
pub struct ConditionSpec {
    /// The name a bypass plan refers to it by: `name = ".."` of the attribute, else the
    /// function's identifier.
    pub name: &'static str,
    /// Runs the condition on the caller as the call is dispatched: `Ok(true)` bypasses the
    /// call; `Ok(false)`, or an `Err` with the condition's error text (logged), runs it.
    pub check: for<'a> fn(&'a BypassCall) -> BoxFutureRef<'a, Result<bool, String>>,
}

inventory::collect!(ProviderSpec);
inventory::collect!(ConditionSpec);

/// Providers linked into this binary, by name.
pub fn providers() -> &'static HashMap<&'static str, &'static ProviderSpec> {
    static ALL: OnceLock<HashMap<&'static str, &'static ProviderSpec>> = OnceLock::new();
    ALL.get_or_init(|| {
        by_name("bypass providers", inventory::iter::<ProviderSpec>.into_iter().map(|spec| (spec.name, spec)))
    })
}

/// Conditions linked into this binary, by name.
pub fn conditions() -> &'static HashMap<&'static str, &'static ConditionSpec> {
    static ALL: OnceLock<HashMap<&'static str, &'static ConditionSpec>> = OnceLock::new();
    ALL.get_or_init(|| {
        by_name(
            "bypass conditions",
            inventory::iter::<ConditionSpec>.into_iter().map(|spec| (spec.name, spec)),
        )
    })
}

/// What a provider returns when its value is already serialized (e.g. bytes read from the
/// cache): passed on unchanged. A provider may also return any `Serialize` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provided(Value);

impl Provided {
    /// Bytes that already are a serialized value of the function's return type; a mismatch
    /// is a decode error at `get`.
    pub fn encoded(bytes: impl Into<Vec<u8>>) -> Provided {
        Provided(bytes.into())
    }

    /// Serializes `value` as the runtime serializes results.
    pub fn value<T: Serialize + ?Sized>(value: &T) -> Result<Provided, Error> {
        rmp_serde::to_vec_named(value)
            .map(Provided)
            .map_err(|e| Error::Encode { what: "a provided value".into(), message: e.to_string() })
    }
}

/// What a provider's value can be: a [`Provided`] (passed on as it is) or any `Serialize`.
pub trait IntoProvided {
    /// The value serialized as the runtime serializes results; `Err` is the text the bypassed
    /// call fails with.
    fn into_provided(self) -> Result<Value, String>;
}

impl IntoProvided for Provided {
    fn into_provided(self) -> Result<Value, String> {
        Ok(self.0)
    }
}

impl<T: Serialize> IntoProvided for T {
    fn into_provided(self) -> Result<Value, String> {
        rmp_serde::to_vec_named(&self).map_err(|e| format!("its value could not be encoded: {e}"))
    }
}

/// What a provider and a condition receive: the call's tag, its `data:` path and its
/// arguments (the original's `(tag, data_path, *args)`), and a context to reach the cluster.
pub struct BypassCall {
    function: String,
    tag: Option<String>,
    data: Option<PathBuf>,
    args: Vec<ArgKind>,
    file_server: Option<String>,
    context: Context,
}

impl BypassCall {
    /// The bypassed function's name.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The call's tag (`_chia_tag`).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The function's `data:` path, as the configuration names it (a file on the head node).
    pub fn data_path(&self) -> Option<&Path> {
        self.data.as_deref()
    }

    /// How many arguments the call was made with (the index bound of [`BypassCall::arg`]).
    pub fn arg_count(&self) -> usize {
        self.args.len()
    }

    /// Argument `index`, decoded as `T`. On the caller (a condition) an argument that is an
    /// `ObjectRef` is waited for; on the worker (a provider) every argument is a value.
    pub async fn arg<T: DeserializeOwned>(&self, index: usize) -> Result<T, Error> {
        let bad = |message: String| {
            Error::Task(TaskError::BadArgument { function: self.function.clone(), index, message })
        };
        match self.args.get(index) {
            None => Err(bad(format!("the call has {} argument(s)", self.args.len()))),
            Some(ArgKind::Value(value)) => rmp_serde::from_slice(value).map_err(|e| bad(e.to_string())),
            Some(ArgKind::Ref(inner)) => ObjectRef::<T>::from_inner(inner.clone()).get().await,
        }
    }

    /// The serialized bytes of argument `index`, when it is a value (not a pending ref).
    pub fn encoded_arg(&self, index: usize) -> Option<&[u8]> {
        match self.args.get(index)? {
            ArgKind::Value(value) => Some(value),
            ArgKind::Ref(_) => None,
        }
    }

    /// A context on the cluster (to call the cache, other services or functions).
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The text of the function's `data:` file, read on the head node.
    pub async fn read_data(&self) -> Result<String, Error> {
        let data_error = |message: String| Error::BypassData { function: self.function.clone(), message };
        let path = self
            .data
            .as_deref()
            .ok_or_else(|| data_error("there is no `data:` path in the bypass configuration".into()))?;
        let bytes = self.read_file(path).await?;
        String::from_utf8(bytes)
            .map_err(|e| data_error(format!("the file {} is not UTF-8 text: {e}", path.display())))
    }

    /// The bytes of `path`, read on the head node by the job's file server. Only the `data:`
    /// files the job's configuration names can be read.
    pub async fn read_file(&self, path: &Path) -> Result<Vec<u8>, Error> {
        let name = self.file_server.as_deref().ok_or_else(|| Error::BypassData {
            function: self.function.clone(),
            message: format!(
                "cannot read {}: the job's bypass configuration names no `data:` files, so no file server runs",
                path.display()
            ),
        })?;
        let server = BypassFilesHandle::lookup(&self.context, name, None).await?.ok_or_else(|| {
            Error::Task(TaskError::ServiceUnavailable {
                service: name.to_string(),
                message: "the bypass file server is gone (its driver ended)".into(),
            })
        })?;
        Ok(server.read(path.to_string_lossy().into_owned()).get().await?.into_vec())
    }
}

// ---------------------------------------------------------------------------- the Bypass object

/// A [`Bypass`] saved by [`Bypass::state`], installed again by [`Bypass::from_state`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BypassState {
    /// The `bypass:` section the bypass was installed with (which functions, their tags and
    /// `data:` paths); providers and conditions set later are in the maps below.
    pub config: BypassConfig,
    /// Function name → the name of the provider that replaces its bypassed calls.
    pub providers: std::collections::BTreeMap<String, String>,
    /// Function name → the name of the condition its bypassed calls must pass.
    pub conditions: std::collections::BTreeMap<String, String>,
}

/// The bypass of a job: loaded from the YAML on the driver, with providers and conditions
/// registered per function. Every change is sent to the head at once, so calls submitted
/// afterwards (and calls nested in them) follow it.
pub struct Bypass {
    cx: Context,
    own: Arc<OwnJob>,
    plan: Mutex<BypassPlan>,
}

impl Bypass {
    /// Reads the `bypass:` section of `yaml_path` (relative `data:` paths are relative to the
    /// file) and installs it on `cx`'s job. `None` is a bypass that does nothing.
    pub async fn load(cx: &Context, yaml_path: Option<&Path>) -> Result<Bypass, Error> {
        let config = match yaml_path {
            Some(path) => BypassConfig::from_file(path).map_err(|e| Error::Config(Arc::new(e)))?,
            None => BypassConfig::default(),
        };
        Bypass::with_config(cx, config).await
    }

    /// Installs `config` on `cx`'s job. With `data:` files, starts the job's file server on the
    /// head node (it ends with the driver). `cx` must be a driver's:
    /// [`Error::BypassOutsideDriver`] inside a task or a service, or on a worker's connection.
    pub async fn with_config(cx: &Context, config: BypassConfig) -> Result<Bypass, Error> {
        // Refused, not applied to the task's job: the plan is the driver's, installed where its
        // calls are decided. A task that changed it would change it under the job's other
        // tasks, running or retried, in an order nobody chose, and the driver's own calls would
        // not see it; on a worker's connection or in a service (which serve every job) it
        // would reach other jobs' tasks — the leak this refusal closes.
        let own = match cx.job() {
            JobLink::Own(own) => own.clone(),
            JobLink::Task { job, function, .. } => {
                return Err(Error::BypassOutsideDriver {
                    node: cx.node_name().to_string(),
                    task: cx.current_task(),
                    function: Some(function.to_string()),
                    job: Some(*job),
                });
            }
            JobLink::Node => {
                return Err(Error::BypassOutsideDriver {
                    node: cx.node_name().to_string(),
                    task: cx.current_task(),
                    function: None,
                    job: None,
                });
            }
        };
        let mut plan = BypassPlan::new(config);
        let data_paths: Vec<String> =
            plan.config.data_paths().iter().map(|path| path.to_string_lossy().into_owned()).collect();
        if !data_paths.is_empty() {
            let generation = own.revision();
            let name = format!("chia.bypass.files.{}.{generation}", cx.client().session().0);
            let options = ServiceOptions::named(&name).on_head();
            BypassFilesHandle::start(cx, options, data_paths).await?;
            plan.file_server = Some(name);
        }
        let bypass = Bypass { cx: cx.clone(), own, plan: Mutex::new(plan) };
        bypass.publish()?;
        Ok(bypass)
    }

    /// Runs `provider` instead of `function` on bypassed calls (`#[chia::provider]` makes
    /// `my_provider::PROVIDER`).
    pub fn set_provider(&self, function: &str, provider: &'static ProviderSpec) -> Result<(), Error> {
        self.change(|plan| {
            plan.providers.insert(function.to_string(), provider.name.to_string());
        })
    }

    /// Bypasses `function`'s calls only when `condition` returns true; it runs on the caller,
    /// last (`#[chia::condition]` makes `my_condition::CONDITION`).
    pub fn set_cond(&self, function: &str, condition: &'static ConditionSpec) -> Result<(), Error> {
        self.change(|plan| {
            plan.conditions.insert(function.to_string(), condition.name.to_string());
        })
    }

    /// The populate-then-replay workflow in one line: `function`'s bypassed calls return the
    /// value the cache (the default namespace's) holds under their tag, and are bypassed only
    /// when it holds one; other calls run (and are cached, if configured).
    pub fn replay_from_cache(&self, function: &str) -> Result<(), Error> {
        self.change(|plan| {
            plan.providers.insert(function.to_string(), replay::cache_replay::PROVIDER.name.to_string());
            plan.conditions.insert(function.to_string(), replay::cache_hit::CONDITION.name.to_string());
        })
    }

    /// What this bypass is, to be installed again later with [`Bypass::from_state`] (the
    /// original's `get_state`): the configuration and the names of its providers and
    /// conditions. Plain data: it can be written to a file or sent to a task.
    pub fn state(&self) -> BypassState {
        let plan = self.plan();
        BypassState { config: plan.config, providers: plan.providers, conditions: plan.conditions }
    }

    /// Installs a saved bypass on `cx`'s job (the original's `load_state`), re-attaching its
    /// providers and conditions by name: each must be linked into this binary, or nothing is
    /// installed and the error names it.
    pub async fn from_state(cx: &Context, state: BypassState) -> Result<Bypass, Error> {
        for (function, provider) in &state.providers {
            if !providers().contains_key(provider.as_str()) {
                return Err(Error::NotLinked {
                    kind: "provider",
                    name: provider.clone(),
                    function: function.clone(),
                });
            }
        }
        for (function, condition) in &state.conditions {
            if !conditions().contains_key(condition.as_str()) {
                return Err(Error::NotLinked {
                    kind: "condition",
                    name: condition.clone(),
                    function: function.clone(),
                });
            }
        }
        let bypass = Bypass::with_config(cx, state.config).await?;
        bypass.change(|plan| {
            plan.providers = state.providers;
            plan.conditions = state.conditions;
        })?;
        Ok(bypass)
    }

    /// The driver's context this bypass is installed on.
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    /// The plan calls follow now.
    pub fn plan(&self) -> BypassPlan {
        self.plan.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn change(&self, edit: impl FnOnce(&mut BypassPlan)) -> Result<(), Error> {
        edit(&mut self.plan.lock().unwrap_or_else(|p| p.into_inner()));
        self.publish()
    }

    /// Installs the plan on the driver and sends it to the head, before any later submission
    /// (both travel on the one control stream, in order). An empty plan is sent too, so that
    /// switching bypass off also reaches calls made inside tasks; with nothing ever configured
    /// nothing is sent.
    fn publish(&self) -> Result<(), Error> {
        let plan = self.plan();
        if !plan.is_empty() || self.own.revision() > 0 {
            let settings = rmp_serde::to_vec_named(&plan)
                .map_err(|e| Error::Encode { what: "the bypass plan".into(), message: e.to_string() })?;
            let revision = self.own.next_revision();
            let job = self.cx.client().session();
            self.cx
                .client()
                .send(&PeerToHead::SetJobSettings(JobSettings { job, revision, settings }))
                .map_err(|e| Error::Send { what: "the bypass plan", cause: Arc::new(e) })?;
        }
        self.own.install((!plan.is_empty()).then(|| Arc::new(plan)));
        Ok(())
    }
}

// ---------------------------------------------------------------------------- the decision

/// Decides a call on the caller. `Err` makes the call invalid (a condition that is not linked
/// here, or that cannot run on this thread).
pub(crate) fn decide(
    cx: &Context,
    function: &str,
    tag: Option<&str>,
    args: &mut Vec<ArgInput>,
) -> Result<(Decision, Option<BypassSpec>), String> {
    let Some(plan) = cx.job().plan() else { return Ok((Decision::Run(RunReason::NotBypassed), None)) };
    let (provider, data, condition) = match plan.verdict(function, tag) {
        Verdict::Run(reason) => {
            if reason == RunReason::NoProvider {
                let job = cx.job().nested_in().unwrap_or_else(|| cx.client().session());
                warn_no_provider_once(job, function);
            }
            return Ok((Decision::Run(reason), None));
        }
        Verdict::Bypass { provider, data, condition } => (provider, data, condition),
    };
    let spec = BypassSpec {
        provider: provider.map(str::to_string),
        data: data.map(|path| path.to_string_lossy().into_owned()),
    };
    if let Some(name) = condition {
        let Some(condition) = conditions().get(name).copied() else {
            return Err(format!(
                "its bypass condition {name} is not linked into this binary ({}); define it with #[chia::condition] in a crate this binary links",
                cx.node_name()
            ));
        };
        // An argument that failed to encode makes the call invalid; it is reported as such.
        if args.iter().any(|arg| arg.0.is_err()) {
            return Ok((Decision::Run(RunReason::NotBypassed), None));
        }
        let call = BypassCall {
            function: function.to_string(),
            tag: tag.map(str::to_string),
            data: data.map(Path::to_path_buf),
            args: std::mem::take(args).into_iter().filter_map(|arg| arg.0.ok()).collect(),
            file_server: plan.file_server.clone(),
            context: cx.clone(),
        };
        let checked = block_on(cx.client().runtime(), CatchUnwind((condition.check)(&call)));
        *args = call.args.into_iter().map(|arg| ArgInput(Ok(arg))).collect();
        let failed = |message: String| {
            tracing::warn!("bypass condition {name} of {function} failed, so the call runs: {message}");
            Ok((Decision::Run(RunReason::ConditionFailed { condition: name.to_string(), message }), None))
        };
        let checked = checked.map_err(|_| {
            format!(
                "its bypass condition {name} runs before the call is sent, blocking this thread, which a current-thread tokio runtime cannot do; use a multi-threaded runtime (`#[tokio::main]`, or `flavor = \"multi_thread\"` in tests)"
            )
        })?;
        match checked {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                return Ok((Decision::Run(RunReason::ConditionFalse { condition: name.to_string() }), None));
            }
            Ok(Err(message)) => return failed(message),
            Err(panic) => return failed(format!("panicked: {}", panic_message(panic))),
        }
    }
    Ok((Decision::Bypassed { provider: spec.provider.clone(), data: spec.data.clone() }, Some(spec)))
}

/// `bypass: true` without a provider or data: said once per job and function, not per call. Keyed
/// by the job too, because a worker decides the nested calls of every job it serves: one job's
/// warning must not silence another's.
fn warn_no_provider_once(job: SessionId, function: &str) {
    /// More than this many (job, function) pairs: start over, so a long-lived worker does not
    /// keep every job it ever served (a job may then be warned again).
    const WARNED_MAX: usize = 4096;
    static WARNED: Mutex<Option<HashSet<(SessionId, String)>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    let warned = warned.get_or_insert_default();
    if warned.len() >= WARNED_MAX {
        warned.clear();
    }
    if warned.insert((job, function.to_string())) {
        tracing::warn!(
            "{function} is `bypass: true` in the plan of job {job} but has no provider and no `data:` path, so it runs for real; register one with Bypass::set_provider"
        );
    }
}

// ---------------------------------------------------------------------------- on the worker

/// Runs what replaces a bypassed call on the worker and says how it ended.
pub(crate) async fn provide(
    context: Context,
    function: String,
    tag: Option<String>,
    args: Vec<ArgValue>,
    spec: BypassSpec,
) -> Outcome {
    let file_server = context.job().plan().and_then(|plan| plan.file_server.clone());
    let call = BypassCall {
        function,
        tag,
        data: spec.data.map(PathBuf::from),
        args: args.into_iter().map(|arg| ArgKind::Value(arg.0)).collect(),
        file_server,
        context,
    };
    let (provider, result) = match spec.provider.as_deref() {
        Some(name) => match providers().get(name) {
            Some(provider) => (name.to_string(), CatchUnwind((provider.run)(&call)).await),
            None => (
                name.to_string(),
                Ok(Err(format!(
                    "the provider is not linked into the worker binary on node {}; define it with #[chia::provider] in a crate the worker links",
                    call.context.node_name()
                ))),
            ),
        },
        None => ("the file server".to_string(), CatchUnwind(Box::pin(serve_data(&call))).await),
    };
    match result {
        Ok(Ok(value)) => Outcome::Value(value),
        Ok(Err(message)) => {
            Outcome::Failed(TaskError::BypassFailed { function: call.function, provider, message })
        }
        Err(panic) => Outcome::Failed(TaskError::BypassFailed {
            function: call.function,
            provider,
            message: format!("panicked: {}", panic_message(panic)),
        }),
    }
}

/// The default provider: the `data:` file's text.
async fn serve_data(call: &BypassCall) -> Result<Value, String> {
    call.read_data().await.map_err(|e| e.to_string())?.into_provided()
}
