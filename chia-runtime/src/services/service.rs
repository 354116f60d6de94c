//! Services: stateful objects hosted on one node whose methods are called remotely, one call
//! at a time (the runtime's "actors"). Define one with `#[chia::service]` on an `impl` block;
//! it generates a typed `<Type>Handle` whose `start`, `lookup` and methods use the untyped
//! [`ServiceHandle`] below.
//!
//! Names are resolved by the head every time ([`ServiceHandle::lookup`]), so a handle found
//! by name is never a stale process-local copy; a missing service is `None`, not an error.
//!
//! A handle is a value: it can be passed to a remote function or service method as an argument,
//! or returned as a result, and works where it arrives (like a Ray actor handle). On the wire
//! it is the service's identity as the head describes it ([`ServiceInfo`]); the receiving side
//! binds it to the context the call runs with (or, for a result, to the connection that
//! fetched it), and calls through it are routed by the head by the service's id as usual. A
//! typed handle checks on arrival that the service is its type with the same signature. A
//! handle whose service has stopped since fails its calls with
//! [`TaskError::ServiceUnavailable`] naming the service. A handle can only be decoded as part
//! of a call's arguments or result: elsewhere there is no connection to bind it to, and
//! decoding fails saying so.

use crate::driver::context::{ArgInput, Context, ObjectRef, decoding_context, send_request};
use crate::driver::registry::ServiceSpec;
use crate::error::Error;
use chia_core::HEAD_NODE_NAME;
use chia_core::protocol::{PeerToHead, ServiceInfo, ServiceStart};
use chia_core::resources::{CPU, NODE_PREFIX};
use chia_core::{ResourceAmount, Resources, Retries, ServiceId, TaskError};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How to start a service: its name, namespace, lifetime and placement.
///
/// ```
/// # extern crate chia_runtime as chia;
/// let options = chia::ServiceOptions::named("results").namespace("co-design").detached().get_if_exists().on_head();
/// ```
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    name: String,
    namespace: String,
    detached: bool,
    get_if_exists: bool,
    request: Resources,
    max_restarts: Retries,
    placement: chia_core::placement::Placement,
    invalid: Option<String>,
}

impl ServiceOptions {
    /// A service called `name`, in the default namespace, ending with the job that starts it,
    /// placed on any node that links its type (it holds no CPU unless asked to).
    pub fn named(name: impl Into<String>) -> ServiceOptions {
        ServiceOptions {
            name: name.into(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            detached: false,
            get_if_exists: false,
            request: Resources::new(),
            max_restarts: Retries::Never,
            placement: Default::default(),
            invalid: None,
        }
    }

    /// Places the service only on a node offering the label `key` = `value` (see
    /// [`Call::label`](crate::Call::label)).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        if let Err(e) = self.placement.labels.insert(key, value) {
            self.invalid.get_or_insert_with(|| e.to_string());
        }
        self
    }

    /// Places the service inside bundle `bundle` of `group`, holding its request (which must
    /// fit in the bundle) from the bundle's reservation while it lives.
    pub fn in_group(mut self, group: &crate::placement::PlacementGroup, bundle: usize) -> Self {
        match group.bundle_ref(Some(bundle)) {
            Ok(bundle) => self.placement.group = Some(bundle),
            Err(message) => {
                self.invalid.get_or_insert(message);
            }
        }
        self
    }

    /// When the service's node is lost, re-create it on another eligible node, up to `restarts`
    /// times (`Retries::Forever`: without limit; default `Retries::Never`: its calls fail and
    /// the name is released). The
    /// new instance starts from its constructor (state kept only in memory is gone); the name,
    /// id and existing handles stay valid, and calls made meanwhile wait for it. Needs
    /// constructor arguments that are values (not `ObjectRef`s).
    pub fn max_restarts(mut self, restarts: Retries) -> Self {
        self.max_restarts = restarts;
        self
    }

    /// The namespace the name is unique in (default [`DEFAULT_NAMESPACE`]); a lookup finds
    /// the service only in the namespace it names.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Outlive the job (driver) that starts it, until stopped or the cluster ends.
    pub fn detached(mut self) -> Self {
        self.detached = true;
        self
    }

    /// If a service with this name and type already runs, return it instead of failing.
    pub fn get_if_exists(mut self) -> Self {
        self.get_if_exists = true;
        self
    }

    /// Hold `amount` of `name` while the service lives (placement by resources).
    pub fn resource(mut self, name: &str, amount: f64) -> Self {
        crate::util::ask_resource(&mut self.request, &mut self.invalid, "resource", name, amount);
        self
    }

    /// Hold `cpus` CPUs while the service lives (default 0).
    pub fn num_cpus(self, cpus: f64) -> Self {
        self.resource(CPU, cpus)
    }

    /// Pin the service to the node called `node`.
    pub fn on_node(mut self, node: &str) -> Self {
        // A sliver of the node's affinity resource: pins without limiting how many services
        // the node may host.
        let result = self.request.set(&format!("{NODE_PREFIX}{node}"), ResourceAmount::from_fixed(1));
        if let Err(e) = result {
            self.invalid.get_or_insert_with(|| format!("node {node:?}: {e}"));
        }
        self
    }

    /// Pin the service to the head node (where the cluster's state directory is).
    pub fn on_head(self) -> Self {
        self.on_node(HEAD_NODE_NAME)
    }
}

/// A running service, untyped. The generated `<Type>Handle` wraps one.
#[derive(Clone)]
pub struct ServiceHandle {
    info: ServiceInfo,
    cx: Context,
}

impl std::fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle").field("info", &self.info).finish()
    }
}

impl ServiceHandle {
    /// Starts a service of type `spec` (used by the generated `<Type>Handle::start`).
    pub async fn start(
        cx: &Context,
        spec: &'static ServiceSpec,
        options: ServiceOptions,
        args: Vec<ArgInput>,
    ) -> Result<ServiceHandle, Error> {
        let ServiceOptions {
            name,
            namespace,
            detached,
            get_if_exists,
            request,
            max_restarts,
            placement,
            invalid,
        } = options;
        let started: ObjectRef<ServiceInfo> =
            send_request(cx, &format!("{}.new", spec.type_name), args, invalid, |task, args| {
                PeerToHead::StartService(ServiceStart {
                    task,
                    service_type: spec.key(),
                    name,
                    namespace,
                    detached,
                    get_if_exists,
                    request,
                    args,
                    max_restarts,
                    placement: placement.boxed(),
                })
            });
        let info = started.get().await?;
        Ok(ServiceHandle { info, cx: cx.clone() })
    }

    /// Asks the head for the running service `name` (in `namespace`, default `"default"`);
    /// `None` when there is none. A service of another type under that name is an error.
    pub async fn lookup(
        cx: &Context,
        spec: &'static ServiceSpec,
        name: &str,
        namespace: Option<&str>,
    ) -> Result<Option<ServiceHandle>, Error> {
        let found = lookup_info(cx, name, namespace).await?;
        let Some(info) = found else { return Ok(None) };
        if let Err(message) = check_type(spec, &info) {
            return Err(Error::Task(TaskError::InvalidCall {
                function: format!("{}.lookup", spec.type_name),
                message,
            }));
        }
        Ok(Some(ServiceHandle { info, cx: cx.clone() }))
    }

    /// Decodes a handle that must be of type `spec` (used by the generated `<Type>Handle`'s
    /// `Deserialize`).
    pub fn deserialize_typed<'de, D: Deserializer<'de>>(
        deserializer: D,
        spec: &'static ServiceSpec,
    ) -> Result<ServiceHandle, D::Error> {
        let handle = ServiceHandle::deserialize(deserializer)?;
        check_type(spec, &handle.info).map_err(D::Error::custom)?;
        Ok(handle)
    }

    /// Calls `method`; the value arrives through the returned ref like a task's.
    pub fn call<T: DeserializeOwned>(&self, method: &str, args: Vec<ArgInput>) -> ObjectRef<T> {
        let function = format!("{}.{method}", self.info.type_name);
        let (service, name) = (self.info.id, self.info.name.clone());
        send_request(&self.cx, &function, args, None, |task, args| PeerToHead::CallService {
            task,
            service,
            name,
            method: method.to_string(),
            args,
        })
    }

    /// Stops the service; its name is free again afterwards. Stopping twice is not an error.
    pub async fn stop(&self) -> Result<(), Error> {
        stop(&self.cx, self.info.id).await
    }

    /// The service as the head described it when this handle was made (a later restart
    /// elsewhere does not update `node` here).
    pub fn info(&self) -> &ServiceInfo {
        &self.info
    }

    /// The name it was started under, unique in its namespace.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The node hosting the service.
    pub fn node(&self) -> &str {
        &self.info.node
    }

    /// The head's id of the service, by which its calls are routed; it stays the same when
    /// the service is restarted on another node.
    pub fn id(&self) -> ServiceId {
        self.info.id
    }
}

/// Whether `info` describes a service of type `spec`, with the same signature.
fn check_type(spec: &ServiceSpec, info: &ServiceInfo) -> Result<(), String> {
    if info.type_name == spec.type_name && info.sig_hash == spec.sig_hash {
        return Ok(());
    }
    Err(format!(
        "the service {:?} is a {} (signature {}), not a {} (signature {})",
        info.name, info.type_name, info.sig_hash, spec.type_name, spec.sig_hash
    ))
}

/// A handle on the wire: the service's identity, under a field name that says what it is.
#[derive(Serialize)]
struct HandleOnWire<'a> {
    service_handle: &'a ServiceInfo,
}

#[derive(Deserialize)]
struct HandleFromWire {
    service_handle: ServiceInfo,
}

impl Serialize for ServiceHandle {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        HandleOnWire { service_handle: &self.info }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ServiceHandle {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ServiceHandle, D::Error> {
        let HandleFromWire { service_handle: info } = HandleFromWire::deserialize(deserializer)?;
        let cx = decoding_context().ok_or_else(|| {
            D::Error::custom(format!(
                "the handle of the service {:?} can only be decoded as an argument or result of a \
                 chia call (there is no connection here to bind it to)",
                info.name
            ))
        })?;
        Ok(ServiceHandle { info, cx })
    }
}

/// Looks up any service by name, whatever its type.
pub async fn lookup_info(
    cx: &Context,
    name: &str,
    namespace: Option<&str>,
) -> Result<Option<ServiceInfo>, Error> {
    let (name, namespace) = (name.to_string(), namespace.unwrap_or(DEFAULT_NAMESPACE).to_string());
    let found: ObjectRef<Option<ServiceInfo>> = send_request(cx, "lookup", Vec::new(), None, |task, _| {
        PeerToHead::LookupService { task, name, namespace }
    });
    found.get().await
}

/// Stops the service called `name` (in `namespace`, default `"default"`), if it runs.
/// Returns whether one was running.
pub async fn stop_service(cx: &Context, name: &str, namespace: Option<&str>) -> Result<bool, Error> {
    match lookup_info(cx, name, namespace).await? {
        Some(info) => stop(cx, info.id).await.map(|()| true),
        None => Ok(false),
    }
}

async fn stop(cx: &Context, service: ServiceId) -> Result<(), Error> {
    let stopped: ObjectRef<()> =
        send_request(cx, "stop", Vec::new(), None, |task, _| PeerToHead::StopService { task, service });
    stopped.get().await
}
