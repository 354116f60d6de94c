//! The worker agent: joins the head with its resources and the functions linked into this
//! binary, runs what the head sends, and reports each outcome. A function that fails or
//! panics fails only its task; the worker keeps serving.

use crate::api::Context;
use crate::client::{Client, Execution};
use crate::error::Error;
use crate::registry::{self, FunctionSpec, Invoke};
use crate::tls::ClusterCredentials;
use chia_core::protocol::{Outcome, PeerToHead, Value, WorkerOffer};
use chia_core::{Resources, TaskError, TaskId};
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use tokio::sync::mpsc;

/// A worker connected to a head.
pub struct Worker {
    context: Context,
    stopped: tokio::sync::watch::Receiver<bool>,
}

impl Worker {
    /// Joins the cluster as `name` offering `resources` and every linked function.
    pub async fn connect(
        credentials: &ClusterCredentials,
        name: &str,
        resources: Resources,
    ) -> Result<Worker, Error> {
        Worker::connect_offering(credentials, name, resources, |_| true).await
    }

    /// Like [`Worker::connect`], but offers only the linked functions `offer` accepts (a node
    /// that should not run some functions, whatever its resources).
    pub async fn connect_offering(
        credentials: &ClusterCredentials,
        name: &str,
        resources: Resources,
        offer: impl Fn(&FunctionSpec) -> bool,
    ) -> Result<Worker, Error> {
        let mut functions: Vec<_> =
            registry::functions().values().filter(|spec| offer(spec)).map(|spec| spec.key()).collect();
        functions.sort();
        let offer = WorkerOffer { resources, functions };
        let (client, executions) = Client::connect(credentials, name, Some(offer)).await?;
        let context = Context::new(client, None);
        let (stop_tx, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(context.clone(), executions, stop_tx));
        Ok(Worker { context, stopped })
    }

    /// The name the head gave this node.
    pub fn node_name(&self) -> &str {
        self.context.node_name()
    }

    /// A context on this worker's connection.
    pub fn context(&self) -> &Context {
        &self.context
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
}

async fn serve(
    context: Context,
    mut executions: mpsc::UnboundedReceiver<Execution>,
    stopped: tokio::sync::watch::Sender<bool>,
) {
    while let Some(execution) = executions.recv().await {
        start(&context, execution);
    }
    let _ = stopped.send(true);
}

/// Starts one execution: a sync function on the blocking pool, an async one as a task. Each
/// reports its own outcome when it ends, so no task waits in between.
fn start(context: &Context, execution: Execution) {
    let Execution { task, function, args, tag: _ } = execution;
    let client: Arc<Client> = context.client().clone();
    let Some(spec) = registry::functions().get(function.as_str()).copied() else {
        // The head only sends what this worker offered; this guards against a head bug.
        report(
            &client,
            task,
            &function,
            Outcome::Failed(TaskError::UnknownFunction { function: function.clone() }),
        );
        return;
    };
    let task_context = context.for_task(task);
    match spec.invoke {
        Invoke::Sync(invoke) => {
            tokio::task::spawn_blocking(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| invoke(task_context, args)));
                report(&client, task, spec.name, outcome(spec, result));
            });
        }
        Invoke::Async(invoke) => {
            tokio::spawn(async move {
                let result = CatchUnwind(invoke(task_context, args)).await;
                report(&client, task, spec.name, outcome(spec, result));
            });
        }
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

fn report(client: &Client, task: TaskId, function: &str, outcome: Outcome) {
    if let Err(e) = client.send(&PeerToHead::Finished { task, outcome }) {
        // The result cannot travel (larger than a frame may be): fail the task instead of
        // leaving it running forever.
        let error = TaskError::BadResult { function: function.to_string(), message: e.to_string() };
        if let Err(e) = client.send(&PeerToHead::Finished { task, outcome: Outcome::Failed(error) }) {
            tracing::error!("could not report {task} to the head: {e}");
        }
    }
}

/// Resolves to the future's output, or to the panic it raised while being polled.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => text.to_string(),
            Err(_) => "(a panic with a non-text payload)".to_string(),
        },
    }
}
