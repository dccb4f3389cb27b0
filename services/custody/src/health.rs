//! Custody's gRPC health: its API is SERVING only while custody can answer cryptograms
//! (unsealed, self-tests passed, audit chain whole, replica active), NOT_SERVING otherwise.
//! Reported to the kit's health service, so that a client or a load balancer asking
//! `grpc.health.v1.Health` for `cms.custody.v1.CustodyService` learns whether to send work.

use std::sync::Arc;

use cms_proto::custody::v1::custody_service_server::CustodyServiceServer;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The gRPC service whose health custody reports.
pub const SERVICE: &str = <CustodyServiceServer<crate::replica::Replica> as NamedService>::NAME;

/// Where custody reports whether it serves; reports nothing when made with `default()`
/// (unit tests, benchmarks).
#[derive(Clone, Default)]
pub struct Health {
    reporter: Option<HealthReporter>,
    /// Reports one at a time, each reading the state it reports under the lock: the last
    /// report is always the latest state.
    order: Arc<tokio::sync::Mutex<()>>,
}

impl Health {
    pub fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter: Some(reporter),
            order: Arc::default(),
        }
    }

    /// Reports `serving()`, read now.
    pub async fn publish(&self, serving: impl FnOnce() -> bool) {
        let Some(reporter) = &self.reporter else {
            return;
        };
        let _in_order = self.order.lock().await;
        let status = if serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status(SERVICE, status).await;
    }
}
