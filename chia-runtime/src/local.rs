//! Connecting a program to a cluster: [`init`] joins the cluster named by the environment, or
//! starts an embedded local cluster (a real head and real workers in this process, talking
//! authenticated QUIC over loopback, the same code paths as a real cluster).

use crate::api::Context;
use crate::client::Client;
use crate::error::Error;
use crate::head::{HeadHandle, start_head};
use crate::tls::{ClusterCredentials, HeadCredentials};
use crate::worker::Worker;
use chia_core::resources::CPU;
use chia_core::{ResourceAmount, Resources};
use std::path::PathBuf;
use std::sync::Arc;

/// Environment variables read by [`init`].
pub mod env {
    /// `host:port` of the head (overrides the address in the cluster file).
    pub const ADDRESS: &str = "CHIA_ADDRESS";
    /// Path of the cluster file the head wrote (`<state dir>/cluster.yaml`).
    pub const CLUSTER_FILE: &str = "CHIA_CLUSTER_FILE";
    /// The head's state directory (default `~/.chia`).
    pub const STATE_DIR: &str = "CHIA_STATE_DIR";
    /// Embedded cluster: number of workers.
    pub const LOCAL_WORKERS: &str = "CHIA_LOCAL_WORKERS";
    /// Embedded cluster: resources of each worker, e.g. `demo=1,adder=2`.
    pub const LOCAL_RESOURCES: &str = "CHIA_LOCAL_RESOURCES";
}

/// The default state directory of a head: `$CHIA_STATE_DIR`, else `~/.chia`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(env::STATE_DIR) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".chia")
}

/// Joins the cluster named by `CHIA_CLUSTER_FILE`/`CHIA_ADDRESS`, or starts an embedded local
/// cluster when neither is set (`CHIA_LOCAL_WORKERS`, `CHIA_LOCAL_RESOURCES` shape it).
///
/// ```no_run
/// # async fn demo() -> Result<(), chia_runtime::Error> {
/// let cx = chia_runtime::init().await?;
/// println!("connected as {}", cx.node_name());
/// # Ok(()) }
/// ```
pub async fn init() -> Result<Context, Error> {
    Init::new().connect().await
}

/// Options for [`init`]: what an embedded cluster holds when no cluster is named in the
/// environment. The environment (`CHIA_LOCAL_WORKERS`, `CHIA_LOCAL_RESOURCES`) overrides
/// these, so a run can be reshaped without recompiling.
#[derive(Clone, Debug)]
pub struct Init {
    local_workers: usize,
    local_resources: String,
}

impl Default for Init {
    fn default() -> Self {
        Init { local_workers: 2, local_resources: String::new() }
    }
}

impl Init {
    pub fn new() -> Init {
        Init::default()
    }

    /// How many workers an embedded cluster starts (default 2).
    pub fn local_workers(mut self, workers: usize) -> Init {
        self.local_workers = workers;
        self
    }

    /// Resources of each embedded worker, e.g. `"adder=2,demo=1"`. `CPU` defaults to the
    /// machine's core count.
    pub fn local_resources(mut self, resources: &str) -> Init {
        self.local_resources = resources.to_string();
        self
    }

    /// Connects (or starts the embedded cluster).
    pub async fn connect(self) -> Result<Context, Error> {
        if let Some(credentials) = credentials_from_env()? {
            let (client, _) = Client::connect(&credentials, "driver", None).await?;
            return Ok(Context::new(client, None));
        }
        let workers = match std::env::var(env::LOCAL_WORKERS) {
            Ok(text) => text.trim().parse().map_err(|_| {
                Error::Setup(format!("{}={text:?} is not a number of workers", env::LOCAL_WORKERS))
            })?,
            Err(_) => self.local_workers,
        };
        let resources_text = std::env::var(env::LOCAL_RESOURCES).unwrap_or(self.local_resources);
        let resources = Resources::parse(&resources_text)
            .map_err(|e| Error::Setup(format!("local cluster resources {resources_text:?}: {e}")))?;
        let cluster = LocalCluster::start(vec![resources; workers]).await?;
        tracing::info!(
            "started an embedded cluster at {} with {workers} worker(s), each {}",
            cluster.head.address(),
            cluster.worker_resources.first().map(ToString::to_string).unwrap_or_default()
        );
        let (client, _) = Client::connect(&cluster.credentials, "driver", None).await?;
        Ok(Context::new(client, Some(Arc::new(cluster))))
    }
}

fn credentials_from_env() -> Result<Option<ClusterCredentials>, Error> {
    let address = std::env::var(env::ADDRESS).ok().filter(|a| !a.is_empty());
    let file = match std::env::var_os(env::CLUSTER_FILE) {
        Some(file) => PathBuf::from(file),
        None if address.is_some() => default_state_dir().join("cluster.yaml"),
        None => return Ok(None),
    };
    let mut credentials = ClusterCredentials::load(&file).map_err(|e| {
        Error::Setup(format!(
            "{e}\n(set {} to the cluster.yaml written by chia-head, or unset {} to use an embedded cluster)",
            env::CLUSTER_FILE,
            env::ADDRESS
        ))
    })?;
    if let Some(address) = address {
        credentials.address = address;
    }
    Ok(Some(credentials))
}

/// A head and workers running in this process over loopback QUIC.
pub struct LocalCluster {
    head: HeadHandle,
    workers: Vec<Worker>,
    worker_resources: Vec<Resources>,
    credentials: ClusterCredentials,
}

impl LocalCluster {
    /// Starts a head on `127.0.0.1` and one worker per entry of `workers`, each offering that
    /// entry's resources (plus `CPU` = the machine's cores when not given).
    pub async fn start(workers: Vec<Resources>) -> Result<LocalCluster, Error> {
        let head_credentials = HeadCredentials::generate().map_err(|e| Error::Setup(e.to_string()))?;
        let head = start_head("127.0.0.1:0".parse().expect("literal address"), head_credentials).await?;
        let credentials = head.cluster_credentials(&head.address().to_string());
        let worker_resources: Vec<Resources> = workers.into_iter().map(with_default_cpus).collect();
        let mut started = Vec::with_capacity(worker_resources.len());
        for (index, resources) in worker_resources.iter().enumerate() {
            started.push(
                Worker::connect(&credentials, &format!("local-{}", index + 1), resources.clone()).await?,
            );
        }
        Ok(LocalCluster { head, workers: started, worker_resources, credentials })
    }

    /// The cluster file contents for connecting to this cluster.
    pub fn credentials(&self) -> &ClusterCredentials {
        &self.credentials
    }

    /// The head.
    pub fn head(&self) -> &HeadHandle {
        &self.head
    }

    /// The workers, in the order given.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// A new driver connection to this cluster.
    pub async fn driver(&self) -> Result<Context, Error> {
        let (client, _) = Client::connect(&self.credentials, "driver", None).await?;
        Ok(Context::new(client, None))
    }

    /// Stops the head (which disconnects everyone).
    pub fn shutdown(&self) {
        self.head.shutdown();
    }
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
