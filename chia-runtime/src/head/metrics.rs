//! The head's metrics endpoint (`chia-head --metrics ADDR`): `GET /metrics` in the Prometheus
//! text format (0.0.4), for the whole cluster. Every metric is listed in `docs/metrics.md`.
//!
//! A scrape takes [`HeadCore::metrics`] under the head's lock — counts the core keeps as tasks
//! move, a look at each node and each shape with queued tasks, no walk of the tasks — and
//! renders it after letting go. Nothing is added to a task's path: what the core counts
//! anyway is all that is served of tasks. What the driver adds is counted where it happens
//! and rarely: a journal batch's commit time, connections and handshakes. Workers' figures
//! (and the figures of the services they host) arrive with their heartbeats and are kept per
//! session by the core; the head's own node reports the same way, like any worker, so its
//! services (the cache) are served as every other node's are.
//!
//! The endpoint is unauthenticated plain HTTP: it listens where it is told, loopback unless
//! told otherwise, and warns when that is not loopback.
//!
//! [`HeadCore::metrics`]: chia_head_core::HeadCore::metrics

use super::Shared;
use chia_core::inspect::Demand;
use chia_core::resources::NODE_PREFIX;
use chia_head_core::observe::{Histogram as CoreHistogram, Metrics, OTHER_FUNCTIONS, SECONDS_BUCKETS};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode, header};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Queue shapes served one series each; the rest are summed under `(other)` (a shape is a
/// function and a request, and requests vary per call: a label each would be memory and
/// scrape size a peer can make the head hold).
const MAX_SHAPE_LABELS: usize = 1_000;

/// Scrapes served at once; more connections wait in the listener's backlog.
const MAX_SCRAPE_CONNECTIONS: usize = 16;

/// How long a scraper has to send a request's headers, from the moment the connection waits
/// for one: an idle kept-alive connection is closed after it too, so the scrape slots cannot be
/// held by connections that send nothing.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Content-Type` of what `/metrics` serves.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Why the metrics endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {address}: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
}

/// Label set of one label.
type OneLabel = [(&'static str, &'static str); 1];

/// What the head's driver counts for its metrics, as it happens: a few atomic adds per
/// connection and per journal batch, never per task.
#[derive(Debug)]
pub(super) struct DriverFigures {
    registry: Registry,
    pub(super) journal_commit: Histogram,
    pub(super) connections_accepted: Counter,
    pub(super) connections_open: Gauge,
    pub(super) handshakes_in_progress: Gauge,
    pub(super) handshakes_retried: Counter,
    /// By the limit that refused them: `total` or `per_source`.
    pub(super) handshakes_refused: Family<OneLabel, Counter>,
    /// By where they failed: `tls`, `timeout` or `hello`.
    pub(super) handshakes_failed: Family<OneLabel, Counter>,
}

impl DriverFigures {
    pub(super) fn new() -> DriverFigures {
        // 50 µs to ~6.5 s: an fdatasync on a fast SSD to a disk that struggles.
        let journal_commit = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let figures = DriverFigures {
            registry: Registry::default(),
            journal_commit,
            connections_accepted: Counter::default(),
            connections_open: Gauge::default(),
            handshakes_in_progress: Gauge::default(),
            handshakes_retried: Counter::default(),
            handshakes_refused: Family::default(),
            handshakes_failed: Family::default(),
        };
        // The registry ends each help text with a period.
        let mut registry = Registry::default();
        registry.register(
            "chia_journal_commit_seconds",
            "Time to write one batch of journal records and fdatasync it (group commit)",
            figures.journal_commit.clone(),
        );
        registry.register(
            "chia_connections_accepted",
            "Connections whose peer was authenticated and said hello (a session opened or resumed)",
            figures.connections_accepted.clone(),
        );
        registry.register(
            "chia_connections_open",
            "QUIC connections the head serves now (handshake done, hello or not)",
            figures.connections_open.clone(),
        );
        registry.register(
            "chia_handshakes_in_progress",
            "Connection attempts between their first packet and their hello",
            figures.handshakes_in_progress.clone(),
        );
        registry.register(
            "chia_handshakes_retried",
            "Connection attempts answered with a QUIC Retry (address validation under load)",
            figures.handshakes_retried.clone(),
        );
        registry.register(
            "chia_handshakes_refused",
            "Connection attempts refused because too many handshakes were in progress, by limit",
            figures.handshakes_refused.clone(),
        );
        registry.register(
            "chia_handshakes_failed",
            "Connection attempts that failed: the QUIC/TLS handshake, the hello deadline, or a missing or bad hello",
            figures.handshakes_failed.clone(),
        );
        // Every label value a family can take shows from the start, at zero, so a rate over
        // it is defined before the first event.
        for limit in ["total", "per_source"] {
            figures.handshakes_refused.get_or_create_owned(&[("limit", limit)]);
        }
        for stage in ["tls", "timeout", "hello"] {
            figures.handshakes_failed.get_or_create_owned(&[("stage", stage)]);
        }
        DriverFigures { registry, ..figures }
    }
}

/// Everything the endpoint serves, in the text format.
pub(super) fn render(shared: &Shared) -> Result<String, std::fmt::Error> {
    // Under the lock only the copy; the text is made after letting go.
    let metrics = shared.lock().core.metrics();
    let mut text = String::with_capacity(16 << 10);
    let mut snapshot = Registry::default();
    snapshot.register_collector(Box::new(CoreSnapshot(metrics)));
    prometheus_text::encode(&mut text, &snapshot)?;
    prometheus_text::encode(&mut text, &shared.figures.registry)?;
    Ok(text)
}

/// Names of the families the head serves itself (as they appear, counters with `_total`),
/// which a service's figure may not take.
const HEAD_FAMILIES: &[&str] = &[
    "chia_head_up_seconds",
    "chia_tasks_submitted_total",
    "chia_tasks_ended_total",
    "chia_task_retries_total",
    "chia_tasks_bypassed_total",
    "chia_task_queued_seconds",
    "chia_task_running_seconds",
    "chia_tasks",
    "chia_queue_depth",
    "chia_queue_oldest_seconds",
    "chia_nodes",
    "chia_resource_capacity",
    "chia_resource_used",
    "chia_services",
    "chia_jobs",
    "chia_result_bytes",
    "chia_stuck_shapes_found_total",
    "chia_stuck_shapes",
    "chia_worker_memory_bytes",
    "chia_worker_cpu_seconds_total",
    "chia_worker_running",
    "chia_worker_attempts_total",
    "chia_worker_bypassed_total",
    "chia_journal_commit_seconds",
    "chia_connections_accepted_total",
    "chia_connections_open",
    "chia_handshakes_in_progress",
    "chia_handshakes_retried_total",
    "chia_handshakes_refused_total",
    "chia_handshakes_failed_total",
];

/// The core's figures, encoded when the registry is.
#[derive(Debug)]
struct CoreSnapshot(Metrics);

/// A sample's value.
#[derive(Clone, Copy)]
enum Value {
    Whole(u64),
    Real(f64),
}

/// Encodes one family of counters or gauges; a family with no samples is left out.
fn family<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(S, Value)],
) -> std::fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut sample = metric.encode_family(labels)?;
        match (kind, *value) {
            (MetricType::Counter, Value::Whole(v)) => {
                sample.encode_counter::<NoLabelSet, u64, u64>(&v, None)?
            }
            (MetricType::Counter, Value::Real(v)) => {
                sample.encode_counter::<NoLabelSet, f64, f64>(&v, None)?
            }
            (_, Value::Whole(v)) => sample.encode_gauge(&v)?,
            (_, Value::Real(v)) => sample.encode_gauge(&v)?,
        }
    }
    Ok(())
}

/// One unlabelled counter or gauge.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: Value,
) -> std::fmt::Result {
    family::<[(&str, &str); 0]>(encoder, name, help, kind, &[([], value)])
}

fn histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[([(&str, &str); 1], &CoreHistogram)],
) -> std::fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, histogram) in samples {
        // The core's buckets are per bucket; the encoder sums them, and its `+Inf` is the count.
        let buckets: Vec<(f64, u64)> =
            SECONDS_BUCKETS.iter().copied().zip(histogram.buckets.iter().copied()).collect();
        metric.encode_family(labels)?.encode_histogram::<NoLabelSet>(
            histogram.sum_seconds,
            histogram.count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

impl Collector for CoreSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let m = &self.0;
        let e = &mut encoder;
        single(
            e,
            "chia_head_up_seconds",
            "Seconds since this head started.",
            Gauge,
            Value::Real(m.head_up.as_secs_f64()),
        )?;

        let by_function = |value: fn(&chia_head_core::observe::FunctionFigures) -> u64| {
            m.functions
                .iter()
                .map(|(name, f)| ([("function", name.as_str())], Value::Whole(value(f))))
                .collect::<Vec<_>>()
        };
        family(
            e,
            "chia_tasks_submitted",
            "Tasks submitted, by function.",
            Counter,
            &by_function(|f| f.counts.submitted),
        )?;
        let mut ended = Vec::new();
        for (name, f) in &m.functions {
            for (outcome, count) in [
                ("finished", f.counts.finished),
                ("failed", f.counts.failed),
                ("cancelled", f.counts.cancelled),
            ] {
                ended.push(([("function", name.as_str()), ("outcome", outcome)], Value::Whole(count)));
            }
        }
        family(
            e,
            "chia_tasks_ended",
            "Tasks that ended, by function and outcome (finished, failed, cancelled).",
            Counter,
            &ended,
        )?;
        family(
            e,
            "chia_task_retries",
            "Runs of tasks started again (a lost worker, a retried error), by function.",
            Counter,
            &by_function(|f| f.counts.retried),
        )?;
        family(
            e,
            "chia_tasks_bypassed",
            "Calls their caller bypassed (a provider or data file instead of the function), by function.",
            Counter,
            &by_function(|f| f.counts.bypassed),
        )?;
        let queued: Vec<_> =
            m.functions.iter().map(|(name, f)| ([("function", name.as_str())], &f.queued)).collect();
        histograms(
            e,
            "chia_task_queued_seconds",
            "Time from submission to first dispatch, by function.",
            &queued,
        )?;
        let running: Vec<_> =
            m.functions.iter().map(|(name, f)| ([("function", name.as_str())], &f.running)).collect();
        histograms(
            e,
            "chia_task_running_seconds",
            "Time from the last dispatch to the end, of tasks that ran, by function.",
            &running,
        )?;

        let c = &m.counts;
        let states =
            [("waiting", c.waiting), ("queued", c.queued), ("running", c.running), ("ended", c.ended)];
        let states: Vec<_> = states.iter().map(|&(state, n)| ([("state", state)], Value::Whole(n))).collect();
        family(
            e,
            "chia_tasks",
            "Tasks the head holds, by state (ended: results still held).",
            Gauge,
            &states,
        )?;

        let shapes = bounded_shapes(&m.demand);
        let depth: Vec<_> = shapes
            .iter()
            .map(|s| {
                ([("function", s.function.as_str()), ("request", s.request.as_str())], Value::Whole(s.queued))
            })
            .collect();
        family(
            e,
            "chia_queue_depth",
            "Tasks queued for a node, by shape (function and request).",
            Gauge,
            &depth,
        )?;
        let oldest: Vec<_> = shapes
            .iter()
            .map(|s| {
                let labels = [("function", s.function.as_str()), ("request", s.request.as_str())];
                (labels, Value::Real(s.oldest_ms as f64 / 1000.0))
            })
            .collect();
        family(
            e,
            "chia_queue_oldest_seconds",
            "Age of the oldest queued task, by shape (function and request).",
            Gauge,
            &oldest,
        )?;

        let paused = m.nodes.iter().filter(|n| n.paused).count() as u64;
        let up = m.nodes.len() as u64 - paused;
        family(
            e,
            "chia_nodes",
            "Nodes joined, by state (paused: waiting for its worker after a head restart).",
            Gauge,
            &[([("state", "up")], Value::Whole(up)), ([("state", "paused")], Value::Whole(paused))],
        )?;
        let mut capacity = Vec::new();
        let mut used = Vec::new();
        for node in &m.nodes {
            // `node:NAME` names a node (for pinning), it is not capacity.
            for (resource, amount) in node.total.iter().filter(|(name, _)| !name.starts_with(NODE_PREFIX)) {
                let labels = [("node", node.name.as_str()), ("resource", resource)];
                capacity.push((labels, Value::Real(amount.as_f64())));
                used.push((labels, Value::Real(node.used.get(resource).as_f64())));
            }
        }
        family(
            e,
            "chia_resource_capacity",
            "Resources a node offers, by node and resource.",
            Gauge,
            &capacity,
        )?;
        family(
            e,
            "chia_resource_used",
            "Resources held by what runs on a node, by node and resource.",
            Gauge,
            &used,
        )?;

        single(e, "chia_services", "Service instances running.", Gauge, Value::Whole(m.services as u64))?;
        single(e, "chia_jobs", "Jobs (connected drivers).", Gauge, Value::Whole(m.jobs as u64))?;
        single(
            e,
            "chia_result_bytes",
            "Bytes of task results the head holds.",
            Gauge,
            Value::Whole(m.result_bytes),
        )?;
        single(
            e,
            "chia_stuck_shapes_found",
            "Times the watchdog found a shape's tasks queued although a node had room and the function.",
            Counter,
            Value::Whole(m.stuck_found),
        )?;
        single(
            e,
            "chia_stuck_shapes",
            "Shapes whose queued tasks the watchdog finds stuck now.",
            Gauge,
            Value::Whole(m.stuck_now as u64),
        )?;

        self.encode_workers(e)
    }
}

/// A queue shape as served.
struct Shape {
    function: String,
    request: String,
    queued: u64,
    oldest_ms: u64,
}

/// The largest [`MAX_SHAPE_LABELS`] shapes as they are, the rest summed under `(other)`.
fn bounded_shapes(demand: &[Demand]) -> Vec<Shape> {
    let mut shapes: Vec<Shape> = demand
        .iter()
        .map(|d| Shape {
            function: d.function.clone(),
            request: d.request.to_string(),
            queued: d.queued,
            oldest_ms: d.oldest_ms_ago,
        })
        .collect();
    if shapes.len() <= MAX_SHAPE_LABELS {
        return shapes;
    }
    shapes.sort_by(|a, b| {
        b.queued.cmp(&a.queued).then_with(|| (&a.function, &a.request).cmp(&(&b.function, &b.request)))
    });
    let rest = shapes.split_off(MAX_SHAPE_LABELS - 1);
    shapes.push(Shape {
        function: OTHER_FUNCTIONS.to_string(),
        request: OTHER_FUNCTIONS.to_string(),
        queued: rest.iter().map(|s| s.queued).sum(),
        oldest_ms: rest.iter().map(|s| s.oldest_ms).max().unwrap_or(0),
    });
    shapes
}

/// One family of service figures, gathered across nodes.
struct ServiceFamily<'m> {
    help: &'m str,
    counter: bool,
    samples: BTreeMap<(&'m str, &'m str), u64>,
}

impl CoreSnapshot {
    /// What the workers reported with their heartbeats, and the figures of their services.
    fn encode_workers(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let reporting: Vec<_> =
            self.0.nodes.iter().filter_map(|n| Some((n.name.as_str(), n.figures.as_ref()?))).collect();
        let per_node = |value: &dyn Fn(&chia_core::protocol::WorkerFigures) -> Value| {
            reporting.iter().map(|(node, f)| ([("node", *node)], value(f))).collect::<Vec<_>>()
        };
        family(
            e,
            "chia_worker_memory_bytes",
            "Resident memory of a node's worker process, as it last reported.",
            Gauge,
            &per_node(&|f| Value::Whole(f.memory_bytes)),
        )?;
        family(
            e,
            "chia_worker_cpu_seconds",
            "CPU time of a node's worker process (and its children that ended), as it last reported.",
            Counter,
            &per_node(&|f| Value::Real(f.cpu_ms as f64 / 1000.0)),
        )?;
        family(
            e,
            "chia_worker_running",
            "Tasks and service calls running on a node's worker, as it last reported.",
            Gauge,
            &per_node(&|f| Value::Whole(f.running)),
        )?;
        family(
            e,
            "chia_worker_attempts",
            "Task attempts a node's worker ran since it started, as it last reported.",
            Counter,
            &per_node(&|f| Value::Whole(f.attempts)),
        )?;
        family(
            e,
            "chia_worker_bypassed",
            "Task attempts a node's worker ran a bypass provider for, as it last reported.",
            Counter,
            &per_node(&|f| Value::Whole(f.bypassed)),
        )?;

        // Families by name, the first report deciding type and help; figures that would not
        // make a valid, unique series are left out.
        let mut services: BTreeMap<String, ServiceFamily> = BTreeMap::new();
        for (node, figures) in &reporting {
            for figure in &figures.services {
                let Some(name) = service_family_name(&figure.name, figure.counter) else { continue };
                let family = services.entry(name).or_insert(ServiceFamily {
                    help: &figure.help,
                    counter: figure.counter,
                    samples: BTreeMap::new(),
                });
                if family.counter == figure.counter {
                    family.samples.entry((node, figure.service.as_str())).or_insert(figure.value);
                }
            }
        }
        for (name, service) in &services {
            let samples: Vec<_> = service
                .samples
                .iter()
                .map(|(&(node, svc), &value)| ([("node", node), ("service", svc)], Value::Whole(value)))
                .collect();
            let kind = if service.counter { Counter } else { Gauge };
            // The encoder adds `_total` to a counter's name.
            let name = name.strip_suffix("_total").unwrap_or(name);
            family(e, name, &help_text(service.help), kind, &samples)?;
        }
        Ok(())
    }
}

/// The family a service figure named `name` goes in (`chia_` + its name, a counter's ending in
/// `_total`), or `None` if it is not a valid metric name, takes a head family's name or a
/// histogram's suffix, or is a gauge named like a counter.
fn service_family_name(name: &str, counter: bool) -> Option<String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return None;
    }
    let full = match (counter, name.ends_with("_total")) {
        (true, true) => format!("chia_{name}"),
        (true, false) => format!("chia_{name}_total"),
        (false, true) => return None,
        (false, false) => format!("chia_{name}"),
    };
    let reserved_suffix =
        ["_bucket", "_sum", "_count", "_created", "_info"].iter().any(|s| full.ends_with(s));
    let taken = HEAD_FAMILIES.contains(&full.as_str())
        || HEAD_FAMILIES.iter().any(|head| full.strip_prefix(head).is_some_and(|rest| rest.starts_with('_')));
    (!reserved_suffix && !taken).then_some(full)
}

/// A help text as one line (the format escapes newlines, but a peer's text need not be kept
/// whole).
fn help_text(help: &str) -> String {
    let help: String = help.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if help.trim().is_empty() { "A figure a service reports.".to_string() } else { help }
}

/// Starts serving `GET /metrics` on `listen` for the head behind `shared`, until `stop` says
/// the head stops. Returns the address it listens on.
pub(super) async fn serve(
    listen: SocketAddr,
    shared: Weak<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<SocketAddr, MetricsError> {
    let listen_error = |source| MetricsError::Listen { address: listen, source };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(listen_error)?;
    let address = listener.local_addr().map_err(listen_error)?;
    if !address.ip().is_loopback() {
        tracing::warn!(
            "serving metrics on {address}, which is not a loopback address: the endpoint is unauthenticated, \
             anyone who can reach it can read the cluster's figures (task function names, node names)"
        );
    }
    tracing::info!("serving metrics on http://{address}/metrics");
    tokio::spawn(accept_scrapes(listener, shared, stop));
    Ok(address)
}

async fn accept_scrapes(
    listener: tokio::net::TcpListener,
    shared: Weak<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = stopped(&mut stop) => return,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!("metrics endpoint: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let shared = shared.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let answer = answer(&request, &shared);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!("metrics endpoint: a connection ended with {e}");
            }
        });
    }
}

/// Resolves once the head stops.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the head is gone: stopped too.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

fn answer<B>(request: &Request<B>, shared: &Weak<Shared>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: String| {
        let mut response = Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "the head serves its metrics at /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "/metrics answers GET\n".into());
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let Some(shared) = shared.upgrade() else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "the head has stopped\n".into());
    };
    match render(&shared) {
        Ok(text) => {
            let mut response = plain(StatusCode::OK, text);
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        Err(std::fmt::Error) => {
            plain(StatusCode::INTERNAL_SERVER_ERROR, "the metrics could not be encoded\n".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_figure_gets_a_family_of_its_own_or_none() {
        assert_eq!(service_family_name("cache_hits_total", true).as_deref(), Some("chia_cache_hits_total"));
        assert_eq!(service_family_name("cache_hits", true).as_deref(), Some("chia_cache_hits_total"));
        assert_eq!(service_family_name("cache_bytes", false).as_deref(), Some("chia_cache_bytes"));
        assert_eq!(service_family_name("cache_total", false), None, "a gauge named like a counter");
        assert_eq!(service_family_name("tasks", false), None, "the head's own family");
        assert_eq!(service_family_name("task_queued_seconds_bucket", false), None, "a histogram's series");
        assert_eq!(service_family_name("nodes_extra", false), None, "inside a head family's names");
        assert_eq!(service_family_name("cache hits", true), None);
        assert_eq!(service_family_name("", true), None);
        assert_eq!(service_family_name("9lives", false), None);
    }

    #[test]
    fn shapes_beyond_the_cap_are_summed_under_other() {
        let demand: Vec<Demand> = (0..MAX_SHAPE_LABELS as u64 + 5)
            .map(|i| Demand {
                function: format!("f{i}"),
                request: chia_core::Resources::new(),
                queued: i + 1,
                oldest_ms_ago: i,
                infeasible: None,
            })
            .collect();
        let shapes = bounded_shapes(&demand);
        assert_eq!(shapes.len(), MAX_SHAPE_LABELS);
        let other = shapes.iter().find(|s| s.function == OTHER_FUNCTIONS).expect("the rest are summed");
        // The six smallest shapes (queued 1..=6) did not get a series of their own.
        assert_eq!((other.queued, other.oldest_ms), (21, 5));
        let total: u64 = shapes.iter().map(|s| s.queued).sum();
        assert_eq!(total, demand.iter().map(|d| d.queued).sum::<u64>());
    }

    #[test]
    fn help_texts_from_peers_stay_on_one_line() {
        assert_eq!(help_text("two\nlines"), "two lines");
        assert_eq!(help_text("  "), "A figure a service reports.");
    }
}
