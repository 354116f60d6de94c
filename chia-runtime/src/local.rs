//! Connecting a program to a cluster: [`init`] joins the cluster named by the environment, or
//! starts an embedded local cluster (a real head and real workers in this process, talking
//! authenticated QUIC over loopback, the same code paths as a real cluster). And
//! [`HeadWithNode`]: a head with its own node, as every head process runs it.

use crate::driver::client::Client;
use crate::driver::context::Context;
use crate::env::{self, default_state_dir};
use crate::error::Error;
use crate::head::{HeadHandle, HeadOptions, start_head_with};
use crate::net::tls::{ClusterCredentials, HeadCredentials};
use crate::worker::{NodeOffer, Worker, with_default_cpus};
use chia_core::Resources;
use chia_core::placement::Labels;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Joins the cluster named by `CHIA_CLUSTER_FILE`/`CHIA_ADDRESS`, or starts an embedded local
/// cluster when neither is set (`CHIA_LOCAL_WORKERS`, `CHIA_LOCAL_RESOURCES` shape it).
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), chia_runtime::Error> {
/// let cx = chia_runtime::init().await?; // here: an embedded cluster of 2 workers
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
    local_labels: Vec<String>,
}

impl Default for Init {
    fn default() -> Self {
        Init { local_workers: 2, local_resources: String::new(), local_labels: Vec::new() }
    }
}

impl Init {
    /// The defaults: an embedded cluster, if one is started, of 2 workers with no resources
    /// but their CPUs and no labels.
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

    /// Labels of the embedded workers, by position (`local-1` gets the first entry, e.g.
    /// `"rack=a,fpga=vu9p"`); workers past the list have none. Checked at
    /// [`Init::connect`], which fails naming the worker and the bad label.
    pub fn local_labels<S: AsRef<str>>(mut self, labels: impl IntoIterator<Item = S>) -> Init {
        self.local_labels = labels.into_iter().map(|l| l.as_ref().to_string()).collect();
        self
    }

    /// Connects (or starts the embedded cluster).
    pub async fn connect(self) -> Result<Context, Error> {
        if let Some(credentials) = credentials_from_env()? {
            // A head that is restarting is waited for, as its drivers already connected do.
            let (client, _) =
                Client::connect_patiently(&credentials, "driver", None, DRIVER_PATIENCE).await?;
            return Ok(Context::new(client, None));
        }
        let workers = match std::env::var(env::LOCAL_WORKERS) {
            Ok(text) => text.trim().parse().map_err(|e: std::num::ParseIntError| Error::Setting {
                setting: env::LOCAL_WORKERS.to_string(),
                value: text.clone(),
                cause: Arc::new(e),
            })?,
            Err(_) => self.local_workers,
        };
        let (resources_setting, resources_text) = match std::env::var(env::LOCAL_RESOURCES) {
            Ok(text) => (env::LOCAL_RESOURCES, text),
            Err(_) => ("Init::local_resources", self.local_resources),
        };
        let resources = Resources::parse(&resources_text).map_err(|e| Error::Setting {
            setting: resources_setting.to_string(),
            value: resources_text.clone(),
            cause: Arc::new(e),
        })?;
        let mut offers = Vec::with_capacity(workers);
        for index in 0..workers {
            let text = self.local_labels.get(index).map_or("", String::as_str);
            let labels = Labels::parse(text).map_err(|e| Error::Setting {
                setting: format!("Init::local_labels (of the embedded worker local-{})", index + 1),
                value: text.to_string(),
                cause: Arc::new(e),
            })?;
            offers.push(NodeOffer { resources: resources.clone(), labels });
        }
        let cluster = LocalCluster::start_nodes(offers, HeadOptions::default()).await?;
        tracing::info!(
            "started an embedded cluster at {} with {workers} worker(s), each {}",
            cluster.head().address(),
            cluster.worker_resources.first().map(ToString::to_string).unwrap_or_default()
        );
        let (client, _) = Client::connect(&cluster.credentials, "driver", None).await?;
        Ok(Context::new(client, Some(Arc::new(cluster))))
    }
}

/// How long `init` waits for a head it cannot reach yet (its default grace period).
const DRIVER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

fn credentials_from_env() -> Result<Option<ClusterCredentials>, Error> {
    let address = std::env::var(env::ADDRESS).ok().filter(|a| !a.is_empty());
    let file = match std::env::var_os(env::CLUSTER_FILE) {
        Some(file) => PathBuf::from(file),
        None if address.is_some() => default_state_dir().join("cluster.yaml"),
        None => return Ok(None),
    };
    let mut credentials = ClusterCredentials::load(&file).map_err(|e| Error::ClusterFile {
        cause: Arc::new(e),
        hint: format!(
            "set {} to the cluster.yaml written by chia-head, or unset {} to use an embedded cluster",
            env::CLUSTER_FILE,
            env::ADDRESS
        ),
    })?;
    if let Some(address) = address {
        credentials.address = address;
    }
    Ok(Some(credentials))
}

/// A head and its own node (`head`, an in-process worker on loopback that hosts the services
/// pinned to the head and runs no functions): what the `chia-head` binary and the embedded
/// cluster run. The head itself knows nothing of workers; this puts the two together.
pub struct HeadWithNode {
    head: HeadHandle,
    node: Worker,
}

impl HeadWithNode {
    /// Starts a head on `listen` and joins its own node to it. The head's state directory (if
    /// any) is protected: the node's built-in services (the bypass file server) never read it.
    pub async fn start(
        listen: SocketAddr,
        credentials: HeadCredentials,
        options: HeadOptions,
    ) -> Result<HeadWithNode, Error> {
        let protected_dirs = options.state_dir.iter().cloned().collect();
        let head = start_head_with(listen, credentials, options).await?;
        let own = head.cluster_credentials(&loopback(head.address()).to_string());
        let node = Worker::connect_head_node(&own, protected_dirs).await?;
        head.attach_own_node(node.in_process());
        Ok(HeadWithNode { head, node })
    }

    /// The head.
    pub fn head(&self) -> &HeadHandle {
        &self.head
    }

    /// The head's own node.
    pub fn node(&self) -> &Worker {
        &self.node
    }
}

/// The address a process on this machine dials to reach a head listening on `address`.
fn loopback(mut address: SocketAddr) -> SocketAddr {
    if address.ip().is_unspecified() {
        address.set_ip(if address.is_ipv6() {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        });
    }
    address
}

/// A head and workers running in this process over loopback QUIC.
pub struct LocalCluster {
    head: HeadWithNode,
    workers: Vec<Worker>,
    worker_resources: Vec<Resources>,
    credentials: ClusterCredentials,
}

impl LocalCluster {
    /// Starts a head on `127.0.0.1` and one worker per entry of `workers`, each offering that
    /// entry's resources (plus `CPU` = the machine's cores when not given).
    pub async fn start(workers: Vec<Resources>) -> Result<LocalCluster, Error> {
        LocalCluster::start_with(workers, HeadOptions::default()).await
    }

    /// [`LocalCluster::start`] with a head run with `options` (for instance a state directory,
    /// so the head keeps a journal). For chia's own tests, like the accessors below.
    #[doc(hidden)]
    pub async fn start_with(workers: Vec<Resources>, options: HeadOptions) -> Result<LocalCluster, Error> {
        LocalCluster::start_nodes(workers.into_iter().map(NodeOffer::from).collect(), options).await
    }

    /// [`LocalCluster::start_with`] with workers that offer labels too (`NodeOffer`).
    #[doc(hidden)]
    pub async fn start_nodes(workers: Vec<NodeOffer>, options: HeadOptions) -> Result<LocalCluster, Error> {
        let head_credentials = HeadCredentials::generate()
            .map_err(|e| crate::error::HeadStartError::Credentials(Box::new(e)))?;
        let listen = "127.0.0.1:0".parse().expect("literal address");
        let head = HeadWithNode::start(listen, head_credentials, options).await?;
        let credentials = head.head().cluster_credentials(&head.head().address().to_string());
        let offers: Vec<NodeOffer> = workers
            .into_iter()
            .map(|offer| NodeOffer { resources: with_default_cpus(offer.resources), ..offer })
            .collect();
        let worker_resources: Vec<Resources> = offers.iter().map(|o| o.resources.clone()).collect();
        let mut started = Vec::with_capacity(offers.len());
        for (index, offer) in offers.into_iter().enumerate() {
            started.push(Worker::connect(&credentials, &format!("local-{}", index + 1), offer).await?);
        }
        Ok(LocalCluster { head, workers: started, worker_resources, credentials })
    }

    /// The cluster file contents for connecting to this cluster.
    #[doc(hidden)]
    pub fn credentials(&self) -> &ClusterCredentials {
        &self.credentials
    }

    /// The head.
    #[doc(hidden)]
    pub fn head(&self) -> &HeadHandle {
        self.head.head()
    }

    /// The workers, in the order given.
    #[doc(hidden)]
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
        self.head.head().shutdown();
    }
}
