//! Figures that service instances report about themselves (the cache's hits, misses, bytes
//! ...), gathered for the heartbeats of the worker that hosts them, so the head's metrics
//! endpoint serves them.
//!
//! Each connection has its own [`ServiceFigures`], not one per process: in the embedded
//! cluster (and in tests) several nodes share a process, and a process-wide list would have
//! every one of them report every instance. An instance registers a [`Weak`] source, so a
//! stopped instance (dropped) disappears from the next heartbeat without unregistering.

use chia_core::protocol::ServiceFigure;
use std::collections::HashMap;
use std::sync::{Mutex, Weak};

/// Whether a figure only grows (a Prometheus counter) or goes up and down (a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FigureKind {
    /// A running total since the instance started (hits, bytes written); served with
    /// `_total` at the end of its name, which the figure's own name may already have.
    Counter,
    /// A level now (entries held, bytes used); its name must not end in `_total`.
    Gauge,
}

/// One figure of a service instance, named in Prometheus style without the `chia_` prefix
/// (`cache_hits_total`; the head adds the prefix and the `node` and `service` labels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Figure {
    /// The metric name without `chia_`: ASCII letters, digits and `_`, not starting with a
    /// digit. A name the head cannot serve (not valid, a head family's or a histogram
    /// suffix's, a gauge ending in `_total`) is left out of the endpoint.
    pub name: &'static str,
    /// The `# HELP` text, one sentence; for a name several instances report, the first
    /// report's text is served.
    pub help: &'static str,
    /// Counter or gauge; a name reported as both keeps the kind of its first report.
    pub kind: FigureKind,
    /// The value now, in the unit the name says (`_bytes`, or a count).
    pub value: u64,
}

/// Something that can say its figures now; called on a heartbeat, so it must be cheap (read
/// counters, take no lock that I/O holds).
pub trait ServiceFigureSource: Send + Sync {
    /// The instance's figures now, each name once.
    fn figures(&self) -> Vec<Figure>;
}

struct Registered {
    service: String,
    source: Weak<dyn ServiceFigureSource>,
}

/// The figure sources of the instances a connection hosts.
#[derive(Default)]
pub struct ServiceFigures {
    sources: Mutex<Vec<Registered>>,
}

impl ServiceFigures {
    /// Reports `source`'s figures under the label `service` while it lives.
    pub fn register(&self, service: &str, source: Weak<dyn ServiceFigureSource>) {
        self.lock().push(Registered { service: service.to_string(), source });
    }

    /// The figures of every instance still alive, forgetting those that are gone. Two live
    /// instances under the same label (the cache in two namespaces) are told apart by a
    /// suffix in registration order (`ChiaCacheStore#2`), so no series is reported twice.
    pub fn collect(&self) -> Vec<ServiceFigure> {
        let live: Vec<(String, std::sync::Arc<dyn ServiceFigureSource>)> = {
            let mut sources = self.lock();
            sources.retain(|registered| registered.source.strong_count() > 0);
            sources
                .iter()
                .filter_map(|registered| Some((registered.service.clone(), registered.source.upgrade()?)))
                .collect()
        };
        // Asked outside the lock: a source that is slow holds up no registration.
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut figures = Vec::new();
        for (label, source) in live {
            let count = seen.entry(label.clone()).or_default();
            *count += 1;
            let service = if *count == 1 { label } else { format!("{label}#{count}") };
            figures.extend(source.figures().into_iter().map(|figure| ServiceFigure {
                service: service.clone(),
                name: figure.name.to_string(),
                help: figure.help.to_string(),
                counter: figure.kind == FigureKind::Counter,
                value: figure.value,
            }));
        }
        figures
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Registered>> {
        // Only whole entries are pushed or removed under the lock.
        self.sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Hits(AtomicU64);

    impl ServiceFigureSource for Hits {
        fn figures(&self) -> Vec<Figure> {
            vec![Figure {
                name: "test_hits_total",
                help: "Hits.",
                kind: FigureKind::Counter,
                value: self.0.load(Ordering::Relaxed),
            }]
        }
    }

    #[test]
    fn a_dropped_source_disappears_and_same_labels_are_told_apart() {
        let figures = ServiceFigures::default();
        let first = Arc::new(Hits(AtomicU64::new(3)));
        let second = Arc::new(Hits(AtomicU64::new(5)));
        figures.register("svc", Arc::downgrade(&first) as Weak<dyn ServiceFigureSource>);
        figures.register("svc", Arc::downgrade(&second) as Weak<dyn ServiceFigureSource>);
        let seen: Vec<(String, u64)> = figures.collect().into_iter().map(|f| (f.service, f.value)).collect();
        assert_eq!(seen, [("svc".to_string(), 3), ("svc#2".to_string(), 5)]);
        drop(first);
        let seen: Vec<(String, u64)> = figures.collect().into_iter().map(|f| (f.service, f.value)).collect();
        assert_eq!(seen, [("svc".to_string(), 5)]);
        assert_eq!(figures.lock().len(), 1, "the dropped source is forgotten");
    }
}
