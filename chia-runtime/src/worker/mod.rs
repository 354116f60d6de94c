//! The worker agent: joins the head with its resources and the functions linked into this
//! binary, runs what the head sends, and reports each outcome. A function that fails or
//! panics fails only its task; the worker keeps serving.

// What a peer sends must never panic this process: no `unwrap` outside tests (an `expect`
// states the invariant that makes it impossible).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use crate::driver::client::{Client, Execution};
use crate::driver::contain::{self, Activity};
use crate::driver::context::Context;
use crate::driver::job::{JobLink, PlanCache};
use crate::driver::process::{RunEnd, TaskControl};
use crate::driver::registry::{self, FunctionSpec, Invoke, ServiceSpec, SharedInstance};
use crate::error::Error;
use crate::head::{OwnNode, OwnNodeReply};
use crate::net::tls::ClusterCredentials;
use crate::services::bypass::provide;
use crate::util::{CatchUnwind, panic_message};
use chia_core::HEAD_NODE_NAME;
use chia_core::protocol::{ArgValue, MAX_FRAME_BYTES, Outcome, PeerToHead, Value, WorkerOffer};
use chia_core::resources::{CPU, NODE_PREFIX};
use chia_core::{FunctionKey, ResourceAmount, Resources, ServiceId, TaskError, TaskId};
use dashmap::DashMap;
use figures::{RunningGuard, Tally};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

mod figures;
mod hooks;
pub(crate) mod main;
mod timeout;

use hooks::Hooks;
use timeout::Timed;

/// What a worker offers beside its functions: resources and labels (`Resources` alone
/// converts into it, with no labels).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOffer {
    /// What the node holds for calls and services to request, as given: no `CPU` is added
    /// here ([`worker_main`](crate::worker_main) and [`LocalCluster`](crate::LocalCluster) add
    /// the core count when it is not named).
    pub resources: Resources,
    /// The node's labels, which [`Call::label`](crate::Call::label) and
    /// [`ServiceOptions::label`](crate::ServiceOptions::label) place by.
    pub labels: chia_core::placement::Labels,
}

impl From<Resources> for NodeOffer {
    fn from(resources: Resources) -> NodeOffer {
        NodeOffer { resources, labels: Default::default() }
    }
}

/// A worker connected to a head.
pub struct Worker {
    context: Context,
    stopped: tokio::sync::watch::Receiver<bool>,
    /// Its instances, as its head hands calls to them when both run in one process.
    in_process: Arc<InProcessCalls>,
}

impl Worker {
    /// Joins the cluster as `name` offering `resources` (and labels) and every linked function.
    pub async fn connect(
        credentials: &ClusterCredentials,
        name: &str,
        resources: impl Into<NodeOffer>,
    ) -> Result<Worker, Error> {
        Worker::connect_offering(credentials, name, resources, |_| true).await
    }

    /// Like [`Worker::connect`], but offers only the linked functions `offer` accepts (a node
    /// that should not run some functions, whatever its resources). Every linked service
    /// type is offered.
    pub async fn connect_offering(
        credentials: &ClusterCredentials,
        name: &str,
        resources: impl Into<NodeOffer>,
        offer: impl Fn(&FunctionSpec) -> bool,
    ) -> Result<Worker, Error> {
        let mut functions: Vec<_> =
            registry::functions().values().filter(|spec| offer(spec)).map(|spec| spec.key()).collect();
        functions.sort();
        let NodeOffer { resources, labels } = resources.into();
        let offer = WorkerOffer { resources, functions, services: service_keys(), head_node: false, labels };
        Worker::join(credentials, name, offer, Vec::new()).await
    }

    /// The head's own node: it runs inside the head process, hosts services pinned to the head
    /// (`node:head`) and runs no functions. The built-in services it hosts never read
    /// `protected_dirs` (the head's state directory, with its CA key), whatever a driver asks.
    /// [`HeadWithNode`](crate::local::HeadWithNode) starts a head with this node.
    pub async fn connect_head_node(
        credentials: &ClusterCredentials,
        protected_dirs: Vec<PathBuf>,
    ) -> Result<Worker, Error> {
        let resources = Resources::new()
            .with(&format!("{NODE_PREFIX}{HEAD_NODE_NAME}"), ResourceAmount::whole(1))
            .expect("node:head is a valid resource name");
        let offer = WorkerOffer {
            resources,
            functions: Vec::new(),
            services: service_keys(),
            head_node: true,
            labels: Default::default(),
        };
        Worker::join(credentials, HEAD_NODE_NAME, offer, protected_dirs).await
    }

    async fn join(
        credentials: &ClusterCredentials,
        name: &str,
        offer: WorkerOffer,
        protected_dirs: Vec<PathBuf>,
    ) -> Result<Worker, Error> {
        let (client, executions) = Client::connect(credentials, name, Some(offer)).await?;
        // The worker's connection, and so every service instance it hosts, serves all jobs:
        // it follows no job's bypass plan and cannot install one.
        let tally = Arc::new(Tally::default());
        figures::report_with_heartbeats(&client, tally.clone());
        let context = Context::new(client, None).protecting(protected_dirs).in_job(JobLink::Node);
        let (stop_tx, stopped) = tokio::sync::watch::channel(false);
        let instances: Arc<DashMap<ServiceId, InstanceQueue>> = Arc::default();
        let in_process = Arc::new(InProcessCalls { context: context.clone(), instances: instances.clone() });
        tokio::spawn(serve(context.clone(), executions, instances, stop_tx, tally));
        Ok(Worker { context, stopped, in_process })
    }

    /// This node's instances, for its head to hand calls to when both run in this process
    /// (the head's own node).
    pub(crate) fn in_process(&self) -> Weak<dyn OwnNode> {
        Arc::downgrade(&self.in_process) as Weak<dyn OwnNode>
    }

    /// The name the head gave this node.
    pub fn node_name(&self) -> &str {
        self.context.node_name()
    }

    /// A context on this worker's connection.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The head let this worker go because another worker of its name joined from its host
    /// (see [`stay_joined`]).
    pub fn was_replaced(&self) -> bool {
        self.context.client().was_replaced()
    }

    /// Resolves when the connection to the head has ended.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        let _ = stopped.wait_for(|s| *s).await;
    }

    /// Leaves the cluster.
    pub async fn shutdown(&self) {
        self.context.shutdown().await;
    }

    /// Leaves the cluster and waits until the tasks' child processes have been killed, so a
    /// process exiting right after leaves none behind.
    pub async fn leave(&self) {
        self.shutdown().await;
        self.stopped().await;
    }
}

pub use crate::util::Backoff;

/// Keeps a worker joined to the head at `credentials.address` until `until` resolves: when the
/// connection cannot be made or is lost (the head restarted, the network failed), it retries
/// with `backoff` and joins again as a new node — with the same credentials, a restarted head
/// on the same state directory accepts it. `joined` is called with each new connection.
///
/// Ends with [`Replaced`] when the head let this worker go for a worker of the same name that
/// joined from the same host: joining again would only push that one out in turn.
pub async fn stay_joined(
    credentials: &ClusterCredentials,
    name: &str,
    resources: impl Into<NodeOffer>,
    backoff: Backoff,
    joined: impl Fn(&Worker),
    until: impl Future<Output = ()>,
) -> Result<(), Replaced> {
    let resources = resources.into();
    let mut until = std::pin::pin!(until);
    let mut attempt = 0;
    loop {
        let connected = tokio::select! {
            connected = Worker::connect(credentials, name, resources.clone()) => connected,
            _ = &mut until => return Ok(()),
        };
        let wait = match connected {
            Ok(worker) => {
                attempt = 0;
                joined(&worker);
                tokio::select! {
                    _ = worker.stopped() => {
                        if worker.was_replaced() {
                            return Err(Replaced { name: worker.node_name().to_string() });
                        }
                        tracing::warn!("lost the connection to the head at {}; joining again", credentials.address);
                        backoff.delay(0)
                    }
                    _ = &mut until => {
                        worker.leave().await;
                        return Ok(());
                    }
                }
            }
            Err(e) => {
                let delay = backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(
                    "cannot join the head at {}: {e}; retrying in {delay:.1?}",
                    credentials.address
                );
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut until => return Ok(()),
        }
    }
}

/// The head let a worker go because a worker of the same name joined from the same host.
#[derive(Debug, thiserror::Error)]
#[error(
    "the head let worker {name} go: another worker named {name} joined from this host (give each worker on a host its own --name)"
)]
pub struct Replaced {
    pub name: String,
}

/// Adds `CPU` = the number of cores when the resources do not say.
pub fn with_default_cpus(mut resources: Resources) -> Resources {
    if !resources.contains(CPU) {
        let cores = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
        // Cannot fail: CPU is a valid name.
        let _ = resources.set(CPU, ResourceAmount::whole(cores));
    }
    resources
}

fn service_keys() -> Vec<FunctionKey> {
    let mut keys: Vec<_> = registry::services().values().map(|spec| spec.key()).collect();
    keys.sort();
    keys
}

async fn serve(
    context: Context,
    mut executions: mpsc::UnboundedReceiver<Execution>,
    instances: Arc<DashMap<ServiceId, InstanceQueue>>,
    stopped: tokio::sync::watch::Sender<bool>,
    tally: Arc<Tally>,
) {
    let running: RunningTasks = Arc::default();
    let mut plans = PlanCache::default();
    while let Some(execution) = executions.recv().await {
        match execution {
            Execution::Task { task, attempt, function, args, tag, bypass, job, timeout } => {
                let lease = Lease { task, attempt };
                // One span per run, so `RUST_LOG=chia=debug` follows a task from the head's
                // decisions to what ran here (a disabled span costs next to nothing).
                let span = tracing::debug_span!(
                    "task",
                    task = %task,
                    function = %function,
                    tag = tag.as_deref(),
                    attempt,
                    node = %context.node_name(),
                    bypassed = bypass.is_some(),
                );
                tracing::debug!(parent: &span, "run starts");
                // The timeout's clock starts here, as the worker starts the run.
                tally.attempt(bypass.is_some());
                let entry = RunningEntry::new(&running, lease, timeout, &tally);
                let context = context.for_task(task, entry.control.clone());
                // The task's context belongs to the task's job, never the worker's.
                let context = match plans.link(task, &function, job) {
                    Ok(job) => context.in_job(job),
                    Err(message) => {
                        let error = TaskError::InvalidCall { function: function.clone(), message };
                        report(context.client(), lease, &function, Outcome::Failed(error));
                        continue;
                    }
                };
                match bypass {
                    Some(bypass) => {
                        let run = async move {
                            let client = context.client().clone();
                            let name = function.clone();
                            // What replaces the call runs under the call's timeout.
                            let run = provide(context, function, tag, args, bypass);
                            let outcome = entry.run_async(run, &name).await;
                            let outcome = entry.end(&name, outcome);
                            report(&client, lease, &name, outcome);
                        };
                        tokio::spawn(tracing::Instrument::instrument(run, span));
                    }
                    None => start(context, entry, lease, Run { function, args, tag }, span),
                }
            }
            Execution::StartInstance { task, service, type_name, args } => {
                tokio::spawn(start_instance(
                    context.clone(),
                    instances.clone(),
                    tally.clone(),
                    task,
                    service,
                    type_name,
                    args,
                ));
            }
            Execution::CallInstance { task, service, method, args } => {
                call_instance(&context, &instances, task, service, method, args, None)
            }
            Execution::Cancel { task, force } => match running.get(&task) {
                Some(control) => {
                    tracing::info!(task = %task, force, "cancelling the task");
                    control.cancel(force);
                }
                None => tracing::debug!(task = %task, "asked to cancel a task that no longer runs here"),
            },
            Execution::StopInstance { service } => {
                // Calls still running hold the instance; it is dropped when the last one ends.
                instances.remove(&service);
            }
        }
    }
    // The head is gone: so are the services it placed here, and what the running tasks
    // started (their results could not be delivered anyway).
    instances.clear();
    for entry in running.iter() {
        entry.value().cancel(true);
    }
    // And what no task owns: nothing of this connection runs any more.
    contain::end_loose(libc::SIGKILL, "the worker stopped serving its head");
    let _ = stopped.send(true);
}

/// What one run of a function is asked to do.
struct Run {
    function: String,
    args: Vec<ArgValue>,
    tag: Option<String>,
}

/// Starts one task in `task_context`: a sync function on the blocking pool, an async one as a
/// task. Each reports its own outcome when it ends, so no task waits in between. The
/// function's hooks run around it on the same thread or task: setup under the timeout, with
/// the function; cleanup (only after a setup that succeeded) after the run is settled, before
/// its processes are killed and its outcome reported.
fn start(task_context: Context, entry: RunningEntry, lease: Lease, run: Run, span: tracing::Span) {
    let Run { function, args, tag } = run;
    let client: Arc<Client> = task_context.client().clone();
    let Some(spec) = registry::functions().get(function.as_str()).copied() else {
        // The head only sends what this worker offered; this guards against a head bug.
        report(
            &client,
            lease,
            &function,
            Outcome::Failed(TaskError::UnknownFunction { function: function.clone() }),
        );
        return;
    };
    let hooks = Hooks::of(spec, lease, tag, &task_context);
    match spec.invoke {
        Invoke::Sync(invoke) => {
            let mut entry = entry;
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let _span = span.enter();
                // The clock starts as the run does, not while it waits for a blocking thread.
                entry.watch_sync(spec.name);
                // What this thread starts while the hooks and the function run is the task's.
                let thread = entry.control.run_on_this_thread();
                let set_up = match &hooks {
                    Some(hooks) => runtime.block_on(hooks.setup()),
                    None => Ok(()),
                };
                let stopped = hooks.as_ref().and_then(Hooks::stopped_during_setup);
                let finished = match (&set_up, stopped) {
                    (Ok(()), Some(stopped)) => stopped,
                    (Ok(()), None) => {
                        let result =
                            std::panic::catch_unwind(AssertUnwindSafe(|| invoke(task_context, args)));
                        outcome(spec, result)
                    }
                    (Err(error), _) => Outcome::Failed(error.clone()),
                };
                let (end, outcome) = entry.settle(spec.name, Some(finished));
                if let (Some(hooks), Ok(())) = (&hooks, set_up) {
                    let ended = hooks::ended(end, entry.control.is_cancelled(), &outcome);
                    runtime.block_on(hooks.cleanup(ended, entry.timeout));
                }
                drop(thread);
                drop(entry);
                report(&client, lease, spec.name, outcome);
            });
        }
        Invoke::Async(invoke) => {
            let run = async move {
                let set_up = AtomicBool::new(false);
                let body = async {
                    if let Some(hooks) = &hooks
                        && let Err(error) = hooks.setup().await
                    {
                        return Outcome::Failed(error);
                    }
                    set_up.store(true, Ordering::Release);
                    if let Some(stopped) = hooks.as_ref().and_then(Hooks::stopped_during_setup) {
                        return stopped;
                    }
                    outcome(spec, CatchUnwind(invoke(task_context, args)).await)
                };
                let finished = entry.run_async(body, spec.name).await;
                let (end, outcome) = entry.settle(spec.name, finished);
                if let Some(hooks) = &hooks
                    && set_up.load(Ordering::Acquire)
                {
                    let ended = hooks::ended(end, entry.control.is_cancelled(), &outcome);
                    hooks.cleanup(ended, entry.timeout).await;
                }
                drop(entry);
                report(&client, lease, spec.name, outcome);
            };
            tokio::spawn(tracing::Instrument::instrument(run, span));
        }
    }
}

async fn start_instance(
    context: Context,
    instances: Arc<DashMap<ServiceId, InstanceQueue>>,
    tally: Arc<Tally>,
    task: TaskId,
    service: ServiceId,
    type_name: String,
    args: Vec<ArgValue>,
) {
    let client = context.client().clone();
    let constructor = format!("{type_name}.new");
    let Some(spec) = registry::services().get(type_name.as_str()).copied() else {
        let error = TaskError::UnknownFunction { function: constructor.clone() };
        return report(&client, Lease::instance(task), &constructor, Outcome::Failed(error));
    };
    // What the constructor starts lives as long as the instance; while it lives, the worker's
    // loose processes may be the instance's.
    let activity = Activity::begin();
    let control = TaskControl::new();
    let outcome = match CatchUnwind((spec.construct)(context.for_task(task, control.clone()), args)).await {
        Ok(Ok(instance)) => {
            let (queue, calls) = mpsc::unbounded_channel();
            let instance = Arc::new(tokio::sync::Mutex::new(instance));
            let host = Host { client: client.clone(), tally };
            tokio::spawn(run_instance(spec, service, instance, calls, host, control, activity));
            instances.insert(service, queue);
            Outcome::Value(Value::new())
        }
        Ok(Err(error)) => {
            control.kill_children();
            Outcome::Failed(name_panic(error, &constructor))
        }
        Err(panic) => {
            control.kill_children();
            Outcome::Failed(TaskError::Panic { function: constructor.clone(), message: panic_message(panic) })
        }
    };
    report(&client, Lease::instance(task), &constructor, outcome);
}

/// The tasks running on this worker, so a cancellation or the loss of the head reaches them.
type RunningTasks = Arc<DashMap<TaskId, Arc<TaskControl>>>;

/// A task's entry in [`RunningTasks`]. Dropped when the task ends, before its outcome is
/// reported, it kills the child processes the task left running: no tool outlives its task.
struct RunningEntry {
    table: RunningTasks,
    lease: Lease,
    control: Arc<TaskControl>,
    /// How long the run may take (see [`timeout`]).
    timeout: Option<Duration>,
    /// A sync function's timer, stopped when the run ends.
    timer: Option<tokio::task::AbortHandle>,
    /// Dropped after the children are killed: the last activity to end ends loose processes.
    _activity: Activity,
    _running: RunningGuard,
}

impl RunningEntry {
    fn new(
        table: &RunningTasks,
        lease: Lease,
        timeout: Option<Duration>,
        tally: &Arc<Tally>,
    ) -> RunningEntry {
        let control = TaskControl::new();
        let activity = Activity::begin();
        table.insert(lease.task, control.clone());
        RunningEntry {
            table: table.clone(),
            lease,
            control,
            timeout,
            timer: None,
            _activity: activity,
            _running: tally.running(),
        }
    }

    fn timed<'a>(&self, function: &'a str) -> Timed<'a> {
        Timed { task: self.lease.task, attempt: self.lease.attempt, function }
    }

    /// Starts the timeout's timer of a sync function, whose run goes on on another thread.
    fn watch_sync(&mut self, function: &'static str) {
        if let Some(limit) = self.timeout {
            let timed = self.timed(function);
            self.timer = Some(timeout::watch_sync(self.control.clone(), limit, timed));
        }
    }

    /// Runs an async function (or provider) under the timeout; `None` when it was dropped.
    async fn run_async<T>(&self, run: impl Future<Output = T>, function: &str) -> Option<T> {
        timeout::run_async(run, &self.control, self.timeout, self.timed(function)).await
    }

    /// Ends the run (its processes killed, its timer stopped) and gives the outcome to report
    /// (see [`RunningEntry::settle`]).
    fn end(self, function: &str, finished: Option<Outcome>) -> Outcome {
        let (_, outcome) = self.settle(function, finished);
        outcome
    }

    /// Ends the timed part of the run: from here its timeout no longer applies. Gives how it
    /// ended and the outcome to report: `TimedOut` if the timeout stopped it, whatever it
    /// returned; otherwise `finished`, what it returned (`None` only for a run dropped after
    /// its timeout). Its processes live on until the entry is dropped (after the cleanup hook).
    fn settle(&self, function: &str, finished: Option<Outcome>) -> (RunEnd, Outcome) {
        let end = self.control.end_run();
        let timeout_ms = self.timeout.map_or(0, |limit| u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
        let attempt = self.lease.attempt;
        match (end, finished) {
            (RunEnd::InTime, Some(outcome)) => (RunEnd::InTime, outcome),
            // A dropped run always timed out first; were it not so, it is still no value.
            (RunEnd::TimedOut, _) | (RunEnd::InTime, None) => (
                RunEnd::TimedOut,
                Outcome::Failed(TaskError::TimedOut { function: function.to_string(), timeout_ms, attempt }),
            ),
        }
    }
}

impl Drop for RunningEntry {
    fn drop(&mut self) {
        if let Some(timer) = &self.timer {
            timer.abort();
        }
        // A later attempt of the same task may run here already: remove only this one's entry.
        self.table.remove_if(&self.lease.task, |_, control| Arc::ptr_eq(control, &self.control));
        self.control.kill_children();
    }
}

/// The calls waiting for one instance, in the order the head sent them.
type InstanceQueue = mpsc::UnboundedSender<QueuedCall>;

struct QueuedCall {
    task: TaskId,
    method: String,
    args: Vec<ArgValue>,
    context: Context,
    /// What the call starts ends with it.
    control: Arc<TaskControl>,
    /// Where its outcome goes when the head handed it over in process; `None`: to the head
    /// over the connection.
    reply: Option<OwnNodeReply>,
}

fn call_instance(
    context: &Context,
    instances: &DashMap<ServiceId, InstanceQueue>,
    task: TaskId,
    service: ServiceId,
    method: String,
    args: Vec<ArgValue>,
    reply: Option<OwnNodeReply>,
) {
    let control = TaskControl::new();
    let call =
        QueuedCall { task, method, args, context: context.for_task(task, control.clone()), control, reply };
    let refused = match instances.get(&service) {
        Some(queue) => queue.send(call).err().map(|e| e.0),
        None => Some(call),
    };
    if let Some(call) = refused {
        let error = TaskError::ServiceUnavailable {
            service: service.to_string(),
            message: format!("this node ({}) holds no such instance", context.node_name()),
        };
        answer(
            context.client(),
            call.reply,
            Lease::instance(call.task),
            &call.method,
            Outcome::Failed(error),
        );
    }
}

/// The instances of the head's own node, to which its head (in the same process) hands calls.
struct InProcessCalls {
    context: Context,
    instances: Arc<DashMap<ServiceId, InstanceQueue>>,
}

impl OwnNode for InProcessCalls {
    fn call(&self, call: chia_head_core::OwnNodeCall, reply: OwnNodeReply) {
        let chia_head_core::OwnNodeCall { task, service, method, args } = call;
        call_instance(&self.context, &self.instances, task, service, method, args, Some(reply));
    }
}

/// A call's outcome, to `reply` when the head handed the call over in process, else to the
/// head over the connection.
fn answer(client: &Client, reply: Option<OwnNodeReply>, lease: Lease, function: &str, outcome: Outcome) {
    match (reply, outcome) {
        // The same bound as over a connection: what the head keeps (its journal) stays within
        // a frame's size.
        (Some(reply), Outcome::Value(value)) if value.len() > MAX_FRAME_BYTES - 1024 => {
            let message = format!("the result is {} bytes, more than a frame may carry", value.len());
            reply(Outcome::Failed(TaskError::BadResult { function: function.to_string(), message }))
        }
        (Some(reply), outcome) => reply(outcome),
        (None, outcome) => report(client, lease, function, outcome),
    }
}

/// Runs an instance's calls in arrival order: one at a time, or all at once for a concurrent
/// service. Ends (dropping the instance) when the instance is stopped and its calls are done.
async fn run_instance(
    spec: &'static ServiceSpec,
    service: ServiceId,
    instance: SharedInstance,
    mut calls: mpsc::UnboundedReceiver<QueuedCall>,
    host: Host,
    constructed: Arc<TaskControl>,
    activity: Activity,
) {
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            call = calls.recv() => match call {
                Some(call) if spec.concurrent => {
                    running.spawn(run_call(spec, instance.clone(), call, host.clone()));
                }
                Some(call) => run_call(spec, instance.clone(), call, host.clone()).await,
                None => break,
            },
            // Reap finished concurrent calls as they end.
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    while running.join_next().await.is_some() {}
    // The last reference: whatever the instance held (files, locks, processes) is released here.
    drop(instance);
    constructed.kill_children();
    drop(activity);
    let _ = host.client.send(&PeerToHead::InstanceStopped { service });
}

/// The worker an instance runs on: its connection and its running counts.
#[derive(Clone)]
struct Host {
    client: Arc<Client>,
    tally: Arc<Tally>,
}

async fn run_call(spec: &'static ServiceSpec, instance: SharedInstance, call: QueuedCall, host: Host) {
    let _running = host.tally.running();
    let client = host.client;
    let QueuedCall { task, method, args, context, control, reply } = call;
    let name = format!("{}.{method}", spec.type_name);
    let result = CatchUnwind((spec.call)(instance, context, method, args)).await;
    control.kill_children();
    let outcome = match result {
        Ok(Ok(value)) => Outcome::Value(value),
        Ok(Err(error)) => Outcome::Failed(name_panic(error, &name)),
        Err(panic) => {
            Outcome::Failed(TaskError::Panic { function: name.clone(), message: panic_message(panic) })
        }
    };
    answer(&client, reply, Lease::instance(task), &name, outcome);
}

/// A panic caught by `run_blocking` does not know which method it was in.
fn name_panic(error: TaskError, function: &str) -> TaskError {
    match error {
        TaskError::Panic { function: unnamed, message } if unnamed.is_empty() => {
            TaskError::Panic { function: function.to_string(), message }
        }
        other => other,
    }
}

fn outcome(spec: &FunctionSpec, result: std::thread::Result<Result<Value, TaskError>>) -> Outcome {
    match result {
        Ok(Ok(value)) => Outcome::Value(value),
        Ok(Err(error)) => Outcome::Failed(error),
        Err(panic) => Outcome::Failed(TaskError::Panic {
            function: spec.name.to_string(),
            message: panic_message(panic),
        }),
    }
}

/// Which run of which task an outcome is for.
#[derive(Clone, Copy, Debug)]
struct Lease {
    task: TaskId,
    attempt: u32,
}

impl Lease {
    /// Service instances and calls run once: their reports carry attempt 0.
    fn instance(task: TaskId) -> Lease {
        Lease { task, attempt: 0 }
    }
}

fn report(client: &Client, lease: Lease, function: &str, outcome: Outcome) {
    let Lease { task, attempt } = lease;
    match &outcome {
        Outcome::Value(value) => tracing::debug!(bytes = value.len(), "run ends with a value"),
        Outcome::Failed(error) => tracing::debug!(%error, "run ends with an error"),
    }
    if let Err(e) = client.send(&PeerToHead::Finished { task, attempt, outcome }) {
        // The result cannot travel (larger than a frame may be): fail the task instead of
        // leaving it running forever.
        let error = TaskError::BadResult { function: function.to_string(), message: e.to_string() };
        if let Err(e) = client.send(&PeerToHead::Finished { task, attempt, outcome: Outcome::Failed(error) })
        {
            tracing::error!("could not report {task} to the head: {e}");
        }
    }
}
