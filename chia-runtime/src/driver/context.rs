//! A connection as user code holds it: [`Context`], typed [`ObjectRef`]s with [`get`] and
//! [`wait`], the arguments of a call ([`IntoArg`]), and sending a request made of them. The
//! builder of function calls, which also decides bypass, is [`Call`](crate::Call), one layer up.

use crate::driver::client::{Client, SlotState};
use crate::driver::figures::ServiceFigureSource;
use crate::driver::job::JobLink;
use crate::driver::process::TaskControl;
use crate::error::Error;
use crate::util::block_on;
use chia_core::protocol::{Arg, PeerToHead, Value};
use chia_core::{TaskError, TaskId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// A connection to a cluster: what remote calls are submitted through.
///
/// A driver gets one from [`crate::init`]; a function running on a worker receives one as its
/// first parameter when it declares `cx: &chia::Context`, and uses it for nested calls.
/// Cloning is cheap; the connection (and an embedded cluster) lives while a clone does.
#[derive(Clone)]
pub struct Context {
    client: Arc<Client>,
    running: Option<RunningTask>,
    job: JobLink,
    /// Directories of this node that its built-in services never read (on the head's node:
    /// the head's state directory).
    protected_dirs: Arc<[PathBuf]>,
    _keep_alive: Option<Arc<dyn Any + Send + Sync>>,
}

/// The task a worker-side context belongs to, so a nested `get` can tell the head that the
/// task is blocked (its CPU may then run the children it waits for).
#[derive(Clone)]
struct RunningTask {
    task: TaskId,
    blocked_sent: Arc<AtomicBool>,
    control: Arc<TaskControl>,
}

impl Context {
    pub(crate) fn new(client: Arc<Client>, keep_alive: Option<Arc<dyn Any + Send + Sync>>) -> Context {
        Context {
            client,
            running: None,
            job: JobLink::own(),
            protected_dirs: Arc::new([]),
            _keep_alive: keep_alive,
        }
    }

    /// This context, on a node whose built-in services must never read `dirs`.
    pub(crate) fn protecting(mut self, dirs: Vec<PathBuf>) -> Context {
        self.protected_dirs = dirs.into();
        self
    }

    /// Directories of this node that its built-in services never read.
    pub(crate) fn protected_dirs(&self) -> &[PathBuf] {
        &self.protected_dirs
    }

    /// A context on an existing client connection (one made with `Client::connect` from
    /// explicit credentials, by chia's own binaries and tests).
    #[doc(hidden)]
    pub fn from_client(client: Arc<Client>) -> Context {
        Context::new(client, None)
    }

    pub(crate) fn for_task(&self, task: TaskId, control: Arc<TaskControl>) -> Context {
        Context {
            client: self.client.clone(),
            running: Some(RunningTask { task, blocked_sent: Arc::new(AtomicBool::new(false)), control }),
            job: self.job.clone(),
            protected_dirs: self.protected_dirs.clone(),
            _keep_alive: self._keep_alive.clone(),
        }
    }

    /// This context, making its calls as part of `job` (a task's context on a worker).
    pub(crate) fn in_job(mut self, job: JobLink) -> Context {
        self.job = job;
        self
    }

    pub(crate) fn job(&self) -> &JobLink {
        &self.job
    }

    /// The node this context runs on: the worker's node name, or `driver-…` for a driver.
    pub fn node_name(&self) -> &str {
        self.client.node_name()
    }

    /// The task this context belongs to, when it runs inside a remote function.
    pub fn current_task(&self) -> Option<TaskId> {
        self.running.as_ref().map(|r| r.task)
    }

    /// Whether the task this context belongs to was cancelled, or ran past its timeout (always
    /// false outside a task). A long computation checks it to stop early; its child processes
    /// are killed anyway. A sync function that never looks keeps its run, and its resources,
    /// until it returns.
    pub fn is_cancelled(&self) -> bool {
        self.running.as_ref().is_some_and(|running| running.control.is_cancelled())
    }

    /// Resolves when the task this context belongs to is cancelled or runs past its timeout
    /// (never outside a task), to `select!` against a long wait.
    pub async fn cancelled(&self) {
        match &self.running {
            Some(running) => running.control.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Starts an external program as a child of the current task, in a process group of its
    /// own, marked with the task (and, in a worker contained by cgroup, in the task's cgroup):
    /// when the task is cancelled, ends, or its worker stops or dies, the program and
    /// everything it started — a `setsid` daemon included — are killed, so no tool outlives
    /// its task (ARCHITECTURE.md, "Cancellation and processes", says what holds where).
    /// Outside a task the child only gets its own group and is killed when the returned handle
    /// is dropped.
    ///
    /// ```
    /// # extern crate chia_runtime as chia;
    /// #[chia::function]
    /// async fn build(cx: &chia::Context, target: String) -> Result<bool, std::io::Error> {
    ///     let mut make = tokio::process::Command::new("sh");
    ///     let status = cx.spawn(make.args(["-c", "test -n \"$0\"", &target]))?.wait().await?;
    ///     Ok(status.success())
    /// }
    /// # #[tokio::main] async fn main() -> Result<(), chia::Error> {
    /// let cx = chia::init().await?;
    /// assert!(build::remote(&cx, "all".to_string()).get().await?);
    /// # Ok(()) }
    /// ```
    pub fn spawn(&self, command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        crate::driver::process::spawn(self.running.as_ref().map(|r| &*r.control), command)
    }

    /// [`Context::spawn`] for a `std::process::Command` (in a sync function).
    pub fn spawn_std(&self, command: &mut std::process::Command) -> std::io::Result<std::process::Child> {
        crate::driver::process::spawn_std(self.running.as_ref().map(|r| &*r.control), command)
    }

    /// Resolves `object`, waiting as long as it takes.
    pub async fn get<T: DeserializeOwned>(&self, object: &ObjectRef<T>) -> Result<T, Error> {
        object.get().await
    }

    /// From a service's constructor: have the head pass every successful result that one of
    /// `rules` matches to `method(tag, value)` of this service, where the result lands.
    pub(crate) fn watch_results(
        &self,
        method: &str,
        rules: Vec<chia_core::protocol::WatchRule>,
    ) -> Result<(), Error> {
        let Some(task) = self.current_task() else {
            return Err(Error::OutsideServiceConstructor { call: "watch_results" });
        };
        self.client
            .send(&PeerToHead::WatchResults { task, method: method.to_string(), rules })
            .map_err(|e| Error::Send { what: "the result watch", cause: Arc::new(e) })
    }

    /// From a service's constructor: report `source`'s figures (counters and gauges) with the
    /// heartbeats of the worker hosting the service, under the label `service`, for as long
    /// as `source` lives (hold the `Arc` in the instance: it goes with the instance). The head's
    /// metrics endpoint serves them as `chia_<name>{node,service}`.
    pub fn report_figures(&self, service: &str, source: std::sync::Weak<dyn ServiceFigureSource>) {
        self.client.service_figures().register(service, source);
    }

    /// Measures one round trip to the head (a liveness check).
    pub async fn ping(&self) -> Result<Duration, Error> {
        self.client.ping().await
    }

    /// Closes the connection; an embedded cluster stops when its last context is gone.
    pub async fn shutdown(&self) {
        self.client.shutdown().await;
    }

    pub(crate) fn client(&self) -> &Arc<Client> {
        &self.client
    }
}

pub(crate) struct RefInner {
    task: TaskId,
    client: Arc<Client>,
    caller: Option<RunningTask>,
}

impl Drop for RefInner {
    fn drop(&mut self) {
        self.client.release(self.task);
    }
}

/// The future result of a remote call, typed by the function's return value.
///
/// Pass it as an argument to another call to chain tasks (the value goes from task to task
/// through the head, not through the driver). When the last clone is dropped the head frees
/// the result.
pub struct ObjectRef<T> {
    inner: Arc<RefInner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        ObjectRef { inner: self.inner.clone(), _type: PhantomData }
    }
}

impl<T> std::fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectRef({})", self.inner.task)
    }
}

impl<T> ObjectRef<T> {
    /// A typed view of the ref an untyped argument holds.
    pub(crate) fn from_inner(inner: Arc<RefInner>) -> ObjectRef<T> {
        ObjectRef { inner, _type: PhantomData }
    }
}

impl<T: DeserializeOwned> ObjectRef<T> {
    /// The id of the task (and of its result).
    pub fn id(&self) -> TaskId {
        self.inner.task
    }

    /// Waits for the result and decodes it.
    pub async fn get(&self) -> Result<T, Error> {
        self.decode(self.raw(None).await?)
    }

    /// Like [`ObjectRef::get`], but gives up after `timeout` with [`Error::Timeout`], which
    /// says so when no node can run the task.
    pub async fn get_timeout(&self, timeout: Duration) -> Result<T, Error> {
        self.decode(self.raw(Some(timeout)).await?)
    }

    /// Blocks the calling thread until the result is ready (for sync code; inside an async
    /// function use `.get().await`).
    pub fn get_blocking(&self) -> Result<T, Error> {
        let client = self.inner.client.clone();
        block_on(client.runtime(), self.get())?
    }

    fn decode(&self, value: Arc<Value>) -> Result<T, Error> {
        let _scope = DecodeScope::enter(BindTo::Ref(self.inner.clone()));
        rmp_serde::from_slice(&value).map_err(|e| Error::Decode {
            task: self.inner.task,
            type_name: std::any::type_name::<T>(),
            message: e.to_string(),
        })
    }

    async fn raw(&self, timeout: Option<Duration>) -> Result<Arc<Value>, Error> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let waiter = Arc::new(Notify::new());
        loop {
            let (state, infeasible) = self.inner.client.poll_slot(self.inner.task, &waiter, true);
            match state {
                SlotState::Value(value) => return Ok(value),
                SlotState::Failed(error) => return Err(error),
                // Only a task still to run can need this worker's CPU; a stored value is
                // merely being fetched.
                SlotState::Pending => self.tell_head_blocked(),
                SlotState::Stored { .. } => {}
            }
            match deadline {
                None => waiter.notified().await,
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, waiter.notified()).await.is_err() {
                        return Err(Error::Timeout {
                            task: self.inner.task,
                            waited: timeout.unwrap_or_default(),
                            infeasible,
                        });
                    }
                }
            }
        }
    }
}

impl<T> ObjectRef<T> {
    /// Cancels the call: if it has not started it never will; if it runs, its context reports
    /// it cancelled ([`Context::is_cancelled`]) and its child processes get SIGTERM, then
    /// SIGKILL after [`CANCEL_GRACE`](crate::CANCEL_GRACE). Either way `get` returns
    /// `TaskError::Cancelled`, and it is never retried. A call that already ended keeps its
    /// result.
    pub fn cancel(&self) -> Result<(), Error> {
        self.send_cancel(false)
    }

    /// Like [`ObjectRef::cancel`], but the child processes are killed at once.
    pub fn force_cancel(&self) -> Result<(), Error> {
        self.send_cancel(true)
    }

    fn send_cancel(&self, force: bool) -> Result<(), Error> {
        let client = &self.inner.client;
        client
            .send(&PeerToHead::Cancel { task: self.inner.task, force })
            .map_err(|e| Error::Send { what: "the cancel", cause: Arc::new(e) })
    }

    fn is_ready(&self, waiter: &Arc<Notify>) -> bool {
        !matches!(self.inner.client.poll_slot(self.inner.task, waiter, false).0, SlotState::Pending)
    }

    fn tell_head_blocked(&self) {
        if let Some(caller) = &self.inner.caller
            && !caller.blocked_sent.swap(true, Ordering::AcqRel)
        {
            // Only a hint to the scheduler; if it cannot be sent the connection is gone.
            let _ = self.inner.client.send(&PeerToHead::Blocked { task: caller.task });
        }
    }
}

/// Resolves `object` (same as `object.get().await`).
pub async fn get<T: DeserializeOwned>(object: &ObjectRef<T>) -> Result<T, Error> {
    object.get().await
}

/// Waits until `num_returns` of `objects` are ready (finished, successfully or not) or
/// `timeout` passes, and returns `(ready, pending)` in the order given, like `ray.wait`.
/// `num_returns` larger than the number of objects waits for all of them.
pub async fn wait<T>(
    objects: &[ObjectRef<T>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>) {
    let want = num_returns.min(objects.len());
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let waiter = Arc::new(Notify::new());
    loop {
        let ready = objects.iter().filter(|o| o.is_ready(&waiter)).count();
        if ready >= want {
            break;
        }
        if let Some(first) = objects.first() {
            first.tell_head_blocked();
        }
        match deadline {
            None => waiter.notified().await,
            Some(deadline) => {
                if tokio::time::timeout_at(deadline, waiter.notified()).await.is_err() {
                    break;
                }
            }
        }
    }
    let (mut ready, mut pending) = (Vec::new(), Vec::new());
    for object in objects {
        if ready.len() < want && object.is_ready(&waiter) {
            ready.push(object.clone());
        } else {
            pending.push(object.clone());
        }
    }
    (ready, pending)
}

/// What a value being decoded belongs to, so that a service handle inside it can be bound to
/// a connection: serde gives `Deserialize` no way to receive one.
enum BindTo {
    /// A task's or service's arguments: the context the call runs with.
    Context(Context),
    /// A result fetched through a ref: the connection (and the task) that made the call.
    Ref(Arc<RefInner>),
}

thread_local! {
    static DECODING: RefCell<Option<BindTo>> = const { RefCell::new(None) };
}

/// Sets what handles decoded on this thread bind to, until dropped (then the outer scope is
/// back, so nested decodes compose). Decoding is synchronous: no await happens inside a scope.
struct DecodeScope(Option<BindTo>);

impl DecodeScope {
    fn enter(bind_to: BindTo) -> DecodeScope {
        DecodeScope(DECODING.with(|slot| slot.replace(Some(bind_to))))
    }
}

impl Drop for DecodeScope {
    fn drop(&mut self) {
        let outer = self.0.take();
        DECODING.with(|slot| *slot.borrow_mut() = outer);
    }
}

/// Decodes `bytes` as one argument of a call running with `cx` (service handles in it bind to
/// `cx`).
pub(crate) fn decode_in<T: DeserializeOwned>(
    cx: &Context,
    bytes: &[u8],
) -> Result<T, rmp_serde::decode::Error> {
    let _scope = DecodeScope::enter(BindTo::Context(cx.clone()));
    rmp_serde::from_slice(bytes)
}

/// The context a handle being decoded on this thread binds to: `None` outside the decoding of
/// a call's arguments or result.
pub(crate) fn decoding_context() -> Option<Context> {
    DECODING.with(|slot| {
        slot.borrow().as_ref().map(|bind_to| match bind_to {
            BindTo::Context(cx) => cx.clone(),
            // Calls through the handle are the fetching session's (a task's, when a task
            // fetched it: its waits then tell the head it is blocked, like its own calls).
            BindTo::Ref(inner) => Context {
                client: inner.client.clone(),
                running: inner.caller.clone(),
                job: JobLink::Node,
                protected_dirs: Arc::new([]),
                _keep_alive: None,
            },
        })
    })
}

/// One argument of a call, already encoded (or a ref to another task's result).
pub struct ArgInput(pub(crate) Result<ArgKind, String>);

pub(crate) enum ArgKind {
    Value(Value),
    Ref(Arc<RefInner>),
}

/// What can be passed where a function takes a `T`: a `T` itself, or an `ObjectRef<T>`.
pub trait IntoArg<T> {
    /// The argument, encoded (used by the generated `call`/`remote`).
    #[doc(hidden)]
    fn into_arg(self) -> ArgInput;
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self) -> ArgInput {
        ArgInput(rmp_serde::to_vec_named(&self).map(ArgKind::Value).map_err(|e| e.to_string()))
    }
}

impl<T> IntoArg<T> for ObjectRef<T> {
    fn into_arg(self) -> ArgInput {
        ArgInput(Ok(ArgKind::Ref(self.inner)))
    }
}

impl<T> IntoArg<T> for &ObjectRef<T> {
    fn into_arg(self) -> ArgInput {
        ArgInput(Ok(ArgKind::Ref(self.inner.clone())))
    }
}

/// Sends a request whose arguments are `args` — a task submission, a service start or a
/// method call — and returns the ref to its answer. `function` names it in errors.
pub(crate) fn send_request<T>(
    cx: &Context,
    function: &str,
    args: Vec<ArgInput>,
    mut invalid: Option<String>,
    build: impl FnOnce(TaskId, Vec<Arg>) -> PeerToHead,
) -> ObjectRef<T> {
    let client = cx.client().clone();
    let task = client.next_task_id();
    let mut keep_refs = Vec::new();
    let mut encoded = Vec::with_capacity(args.len());
    for (index, ArgInput(arg)) in args.into_iter().enumerate() {
        match arg {
            Ok(ArgKind::Value(value)) => encoded.push(Arg::Value(value)),
            Ok(ArgKind::Ref(inner)) => {
                encoded.push(Arg::Ref(inner.task));
                keep_refs.push(inner);
            }
            Err(e) => {
                invalid.get_or_insert_with(|| format!("argument {index} could not be encoded: {e}"));
            }
        }
    }
    match invalid {
        Some(message) => {
            client.fail_locally(task, TaskError::InvalidCall { function: function.into(), message })
        }
        None => client.request(task, function, &build(task, encoded)),
    }
    // The request is queued before any release of the argument refs, and the head holds the
    // dependencies from the request on, so dropping them now is safe.
    drop(keep_refs);
    ObjectRef { inner: Arc::new(RefInner { task, client, caller: cx.running.clone() }), _type: PhantomData }
}
