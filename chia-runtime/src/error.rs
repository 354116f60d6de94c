//! The error a user sees from `get`, `wait` and `init`.

use chia_core::{SessionId, TaskError, TaskId};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything a call into the runtime can fail with. Match on the kind you handle and keep a
/// `_` arm: new kinds may be added.
///
/// Every message is complete on its own, its cause included, so an error printed with `{}`
/// says what happened. A kind with an underlying error keeps it, typed, in its `cause` field
/// (for code to match on) rather than as [`source`](std::error::Error::source), so that a
/// reporter printing the chain does not say it twice.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task ran (or was rejected) and failed; the inner error names the function.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// `get` gave up waiting. When no node could run the task, `infeasible` says why.
    #[error("{task} did not finish within {waited:?}{}", infeasible_note(.infeasible))]
    Timeout {
        /// The task waited for.
        task: TaskId,
        /// How long `get` waited.
        waited: Duration,
        /// Why no node can run it now, when the head said so; `None` when it is queued or
        /// running.
        infeasible: Option<String>,
    },
    /// The value arrived but is not of the type the `ObjectRef` expects.
    #[error("the result of {task} could not be decoded as {type_name}: {message}")]
    Decode {
        /// The task whose result it is.
        task: TaskId,
        /// The type the `ObjectRef` expects.
        type_name: &'static str,
        /// What the decoder said.
        message: String,
    },
    /// The connection to the head ended before the result arrived; the text says how it
    /// ended (the head closed it, it could not be taken up again within the grace period ...).
    #[error("lost the connection to the head: {0}")]
    Disconnected(String),
    /// The head no longer holds the result of `task` (it was released, or lost when a head
    /// without a state directory restarted).
    #[error("the head no longer holds the result of {task}")]
    ResultLost {
        /// The task whose result is gone.
        task: TaskId,
    },
    /// Joining the cluster at `address` failed; `cause` says how, and whether trying again
    /// may help ([`JoinError::is_retryable`]).
    #[error("could not join the cluster at {address}: {cause}")]
    Join {
        /// The head's address, as the cluster file or `CHIA_ADDRESS` gives it.
        address: String,
        /// What went wrong.
        cause: JoinError,
    },
    /// The cluster file (`CHIA_CLUSTER_FILE`, or `cluster.yaml` in the default state
    /// directory when only `CHIA_ADDRESS` is set) cannot be read or holds unusable credentials.
    #[error("{cause}\n({hint})")]
    ClusterFile {
        /// Why it cannot be used (the error names the file).
        cause: Arc<dyn std::error::Error + Send + Sync>,
        /// What to set instead.
        hint: String,
    },
    /// A setting (an environment variable, or what was given to [`Init`](crate::Init)) is not
    /// valid.
    #[error("{setting}={value:?} is not valid: {cause}")]
    Setting {
        /// The setting: the environment variable's name, or the `Init` method.
        setting: String,
        /// The value given.
        value: String,
        /// Why it is not valid.
        cause: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A head (the embedded cluster's, or `chia-head`'s) could not start.
    #[error(transparent)]
    HeadStart(Arc<HeadStartError>),
    /// A message to the head could not be sent: it could not be encoded, or it is larger than
    /// a frame may be. `what` names the message.
    #[error("could not send {what}: {cause}")]
    Send {
        /// The message that was not sent.
        what: &'static str,
        /// Why not.
        cause: Arc<chia_core::protocol::ProtocolError>,
    },
    /// A call that only a service's constructor may make was made elsewhere; `call` names it.
    #[error("{call} can be called only from a service's constructor")]
    OutsideServiceConstructor {
        /// The call that was refused.
        call: &'static str,
    },
    /// A value could not be encoded (MessagePack) to be sent: `what` names it.
    #[error("{what} could not be encoded: {message}")]
    Encode {
        /// The value: an argument, a service's constructor arguments, a cache write ...
        what: String,
        /// What the encoder said.
        message: String,
    },
    /// A blocking call (`get_blocking`, `remote_blocking`) was made on a current-thread tokio
    /// runtime, where it would wait forever for the thread it blocks.
    #[error("a blocking chia call was made on a current-thread tokio runtime; use `.await` instead")]
    BlockingOnCurrentThread,
    /// A saved bypass names a provider or condition that is not linked into this binary.
    #[error(
        "the saved bypass names the {kind} {name} for {function}, which is not linked into this binary; define it with #[chia::{kind}] in a crate this binary links"
    )]
    NotLinked {
        /// `provider` or `condition`.
        kind: &'static str,
        /// The provider's or condition's registered name.
        name: String,
        /// The function the bypass rule is for.
        function: String,
    },
    /// A bypass provider could not read the recorded data of `function`.
    #[error("bypass data of {function}: {message}")]
    BypassData {
        /// The bypassed function.
        function: String,
        /// What is wrong with the data.
        message: String,
    },
    /// The cache's budget is invalid, or its store could not be opened.
    #[error(transparent)]
    Cache(Arc<chia_cache::CacheError>),
    /// The `cache:` or `bypass:` section of the YAML file could not be loaded; the error names
    /// the section, the file, and where known the line and function.
    #[error(transparent)]
    Config(Arc<chia_cache::SectionError>),
    /// `start_cache` was given a YAML file whose `cache:` section differs from the one the
    /// running cache follows (its automatic writes would not follow the file).
    #[error(
        "a cache is already running with another cache: section than {}; stop it (stop_cache) to start it \
         with this one, or start without a YAML file to use it as it is",
        path.display()
    )]
    CacheConfigConflict {
        /// The YAML file given to `start_cache`.
        path: PathBuf,
    },
    /// The `cache:` section sets, for `function`, a `field` that this version reads but does
    /// not apply to automatic writes yet (`ttl`, `key`, `single_flight`): the cache is not
    /// started, rather than started without it.
    #[error(
        "{}: `{field}:` of {function} in the cache: section is not applied by this version of chia yet \
         (automatic writes would ignore it); remove it to start the cache",
        path.display()
    )]
    CacheRuleNotApplied {
        /// The YAML file.
        path: PathBuf,
        /// The function whose rule sets it.
        function: String,
        /// The setting.
        field: &'static str,
    },
    /// `start_cache` found a cache already running with another directory or budget.
    #[error(
        "a cache is already running in {} with a budget of {}; start_cache asked for {} with {}. \
         Pass the same directory and budget to use it, or stop it (stop_cache) to start another",
        running_dir.display(),
        describe_bytes(*running_budget),
        requested_dir.display(),
        describe_bytes(*requested_budget)
    )]
    CacheConflict {
        /// The running cache's directory (on the head).
        running_dir: PathBuf,
        /// The running cache's budget, in bytes.
        running_budget: u64,
        /// The directory `start_cache` asked for.
        requested_dir: PathBuf,
        /// The budget `start_cache` asked for, in bytes.
        requested_budget: u64,
    },
    /// A `Bypass` was created on a context that is not a driver's: inside a task (`function`,
    /// of `job`), inside a service's constructor or method, or on a worker's own connection.
    /// A job's bypass is its driver's alone, so it is refused there rather than applied.
    #[error(
        "Bypass can be created only by a driver, not {}: a bypass belongs to its driver's job, and every task of the job \
         follows it, nested calls included; create it in the driver, before the calls it should cover",
        bypass_place(.node, .task, .function, .job)
    )]
    BypassOutsideDriver {
        /// The node it was created on.
        node: String,
        /// The task (or service call) it was created in, if any.
        task: Option<TaskId>,
        /// That task's function, when it is a task of a function.
        function: Option<String>,
        /// The job that task belongs to.
        job: Option<SessionId>,
    },
    /// The key/value store (`chia::kv`) refused a key or value, or cannot use its file.
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// How joining a cluster failed (inside [`Error::Join`]).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The head's address could not be resolved.
    #[error("cannot resolve the address: {0}")]
    Resolve(Arc<std::io::Error>),
    /// The head's address resolves to no socket address.
    #[error("the address resolves to nothing")]
    NoAddress,
    /// This process could not open its UDP endpoint.
    #[error("cannot open a QUIC endpoint: {0}")]
    Endpoint(Arc<std::io::Error>),
    /// The cluster file's certificates or keys cannot be used.
    #[error("the cluster file's credentials cannot be used: {0}")]
    Credentials(Arc<dyn std::error::Error + Send + Sync>),
    /// A connection could not even be started (the address or configuration is refused).
    #[error("cannot start a connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The head could not be reached, or the connection broke during the handshake.
    #[error("TLS/QUIC handshake failed: {0}")]
    Handshake(quinn::ConnectionError),
    /// One side refused the other's certificate: the cluster file is another cluster's, or
    /// its member certificate is revoked, expired or not the head's CA's. `explanation` says
    /// which, in words.
    #[error("{explanation}")]
    Certificate {
        /// What was refused, and how to fix it.
        explanation: String,
        /// The connection error the refusal arrived as.
        cause: quinn::ConnectionError,
    },
    /// The head accepted the connection but did not answer the hello (in time, or at all).
    #[error("{0}")]
    NoAnswer(String),
    /// The head answered and refused us (another protocol version, a name in use ...).
    #[error("the head rejected us: {reason}")]
    Rejected {
        /// The head's reason.
        reason: String,
    },
    /// The head's first answer was not a welcome or a refusal.
    #[error("unexpected first answer from the head: {0}")]
    Protocol(String),
    /// Joining was tried again for `waited`, and the last attempt failed with `last`.
    #[error("{last} (tried for {waited:?})")]
    GaveUp {
        /// How long joining was tried.
        waited: Duration,
        /// How the last attempt failed.
        last: Box<JoinError>,
    },
}

impl JoinError {
    /// Whether trying again later may succeed: the head may be starting or restarting, or the
    /// network down for now. A refusal or a certificate that will not do is the same on every
    /// attempt.
    pub fn is_retryable(&self) -> bool {
        match self {
            JoinError::Resolve(_)
            | JoinError::NoAddress
            | JoinError::Endpoint(_)
            | JoinError::Handshake(_)
            | JoinError::NoAnswer(_) => true,
            JoinError::Credentials(_)
            | JoinError::Connect(_)
            | JoinError::Certificate { .. }
            | JoinError::Rejected { .. }
            | JoinError::Protocol(_) => false,
            // `init` gave up on a head that may still come back.
            JoinError::GaveUp { last, .. } => last.is_retryable(),
        }
    }
}

/// Why a head could not start (inside [`Error::HeadStart`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeadStartError {
    /// Its certificates could not be made or loaded, or its TLS configuration failed.
    #[error("the head's credentials: {0}")]
    Credentials(Box<dyn std::error::Error + Send + Sync>),
    /// It cannot listen on `address`.
    #[error("cannot listen on {address}: {cause}")]
    Listen {
        /// The address it was to listen on.
        address: std::net::SocketAddr,
        /// Why not.
        cause: std::io::Error,
    },
    /// It was started outside a tokio runtime.
    #[error("the head needs a tokio runtime")]
    NoRuntime,
    /// Its journal (in the state directory) cannot be opened or read.
    #[error(transparent)]
    Journal(Box<dyn std::error::Error + Send + Sync>),
    /// The journal was read but its records do not make a state the head can resume from.
    #[error("{}: {cause}", path.display())]
    Recover {
        /// The journal's path.
        path: PathBuf,
        /// What is wrong with its records.
        cause: chia_head_core::SnapshotError,
    },
}

impl From<HeadStartError> for Error {
    fn from(error: HeadStartError) -> Error {
        Error::HeadStart(Arc::new(error))
    }
}

/// What the key/value store ([`chia::kv`](crate::kv)) refuses or cannot do. Keys and paths are
/// named; a key is shown escaped, and cut after 80 characters.
///
/// It travels from the store's service to the caller as a value, so it is serializable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum KvError {
    /// The key is empty, too long or holds a control character.
    #[error("kv key {} is not valid: {reason}", shown_key(.key))]
    BadKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The encoded value is larger than a value may be.
    #[error("the value for kv key {} is {bytes} bytes encoded; a value may have at most {limit}", shown_key(.key))]
    ValueTooLarge {
        /// The key.
        key: String,
        /// The encoded value's size, in bytes.
        bytes: u64,
        /// The most a value may have, in bytes.
        limit: u64,
    },
    /// Storing the value would take the store past its bound on keys or bytes.
    #[error("the kv store is full, so {} was not set: {reason}", shown_key(.key))]
    StoreFull {
        /// The key that was not set.
        key: String,
        /// Which bound it would pass.
        reason: String,
    },
    /// The stored value is not of the type asked for.
    #[error("kv key {} does not hold a {expected}: {message}", shown_key(.key))]
    WrongType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: String,
        /// What the decoder said.
        message: String,
    },
    /// The value could not be encoded (its `Serialize` failed).
    #[error("the value for kv key {} (a {type_name}) could not be encoded: {message}", shown_key(.key))]
    Encode {
        /// The key.
        key: String,
        /// The value's type.
        type_name: String,
        /// What the encoder said.
        message: String,
    },
    /// The change could not be saved to the store's file on the head, so it was not made.
    #[error("cannot save the kv store to {path} on the head: {message}; the change was not made")]
    Persist {
        /// The store's file on the head.
        path: String,
        /// Why it could not be written.
        message: String,
    },
    /// The store's file on the head cannot be read or is damaged: the store does not start
    /// rather than start empty and lose what the file holds.
    #[error(
        "the kv store file {path} on the head cannot be used: {message}. Nothing was changed; restore the \
         file, or move it away to start with an empty store"
    )]
    Unreadable {
        /// The store's file on the head.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// More watches are waiting on the store than it lets wait at once.
    #[error("{limit} kv watches are waiting already, the most the store lets wait at once")]
    TooManyWatches {
        /// The most watches that may wait at once.
        limit: usize,
    },
}

/// A key as an error shows it: escaped (a control character is visible), at most 80 characters.
fn shown_key(key: &str) -> String {
    const SHOWN: usize = 80;
    match key.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &key[..cut], key.len()),
        None => format!("{key:?}"),
    }
}

/// Where a refused `Bypass` was created, as the error says it.
fn bypass_place(
    node: &str,
    task: &Option<TaskId>,
    function: &Option<String>,
    job: &Option<SessionId>,
) -> String {
    match (task, function, job) {
        (Some(task), Some(function), Some(job)) => {
            format!("inside task {task} ({function}) of job {job} on node {node}")
        }
        (Some(task), _, _) => format!("inside {task}, a service's constructor or method call on node {node}"),
        _ => format!("on the connection of worker {node}"),
    }
}

/// `1073741824 bytes (1 GiB)`: the exact figure, and the largest binary unit it is a whole
/// number of, so two budgets that differ are visibly different.
fn describe_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    match UNITS.iter().find(|(_, shift)| bytes != 0 && bytes.is_multiple_of(1u64 << shift)) {
        Some((unit, shift)) => format!("{bytes} bytes ({} {unit})", bytes >> shift),
        None => format!("{bytes} bytes"),
    }
}

fn infeasible_note(infeasible: &Option<String>) -> String {
    match infeasible {
        Some(reason) => format!("; it is infeasible: {reason}"),
        None => String::new(),
    }
}
