//! Prometheus metrics of a service, served as text on the plaintext ops port.
//!
//! Label values come from closed sets: the method label is a served method or "unknown"
//! ([`crate::served`]), never a path as a caller sent it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::served::Method;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: Arc<str>,
    code: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Cheap to clone; all clones record into one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    handshakes: Family<OutcomeLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "cms",
            [(
                std::borrow::Cow::Borrowed("service"),
                std::borrow::Cow::Owned(service.to_owned()),
            )]
            .into_iter(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        let handshakes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "grpc_server_requests",
            "gRPC requests handled, by method and status code",
            requests.clone(),
        );
        registry.register(
            "grpc_server_request_duration_seconds",
            "gRPC request latency until response headers, by method",
            latency.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the gRPC port, by outcome",
            handshakes.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
            handshakes,
        }
    }

    /// Counts one request of `method` (its path, or "unknown": see [`crate::served`]).
    pub fn request(&self, method: &Method, code: i32, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.path.clone(),
                code,
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.path.clone(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn handshake(&self, outcome: &'static str) {
        self.handshakes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Registers a service-specific metric.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, metric);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
