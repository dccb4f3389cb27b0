//! Channels to the services behind the gateway, and their health as the gateway sees it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cms_kit::client::{self, Channel, UpstreamSettings};
use cms_kit::tls::TlsSource;
use cms_proto::common::v1::ServingState;
use cms_proto::gateway::v1::ServiceStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::Error;
use crate::config::Backends as BackendSettings;

/// One upstream: where it is, who it must be, and a lazily connecting channel.
#[derive(Clone)]
pub struct Backend {
    pub name: &'static str,
    pub settings: UpstreamSettings,
    pub channel: Channel,
}

#[derive(Clone)]
pub struct Backends {
    pub template: Backend,
    pub directory: Backend,
    pub custody: Backend,
}

impl Backends {
    pub fn connect(settings: &BackendSettings, tls: &Arc<TlsSource>) -> Result<Self, Error> {
        let one = |name, s: &UpstreamSettings| -> Result<Backend, Error> {
            Ok(Backend {
                name,
                settings: s.clone(),
                channel: client::channel(s, tls.clone())?,
            })
        };
        Ok(Self {
            template: one("template", &settings.template)?,
            directory: one("directory", &settings.directory)?,
            custody: one(
                "custody",
                &settings.custody.upstream(&settings.custody.address),
            )?,
        })
    }

    pub fn all(&self) -> [&Backend; 3] {
        [&self.template, &self.directory, &self.custody]
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Backend {
    /// Asks the service's gRPC health endpoint. A connection is only made to a server whose
    /// certificate carries the configured SPIFFE ID, so a successful probe verifies it.
    pub async fn probe(&self) -> ServiceStatus {
        let started = Instant::now();
        let mut client = HealthClient::new(self.channel.clone());
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(PROBE_TIMEOUT);
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, client.check(request)).await;
        let mut status = ServiceStatus {
            name: self.name.to_owned(),
            address: self.settings.address.clone(),
            checked_at: Some(SystemTime::now().into()),
            latency_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        match outcome {
            Ok(Ok(response)) => {
                status.identity = self.settings.identity.to_string();
                status.version = response
                    .metadata()
                    .get(cms_kit::trace::VERSION_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let serving = response.into_inner().status;
                status.state = if serving == ServingStatus::Serving as i32 {
                    ServingState::Serving
                } else {
                    status.detail = "health check says not serving".into();
                    ServingState::NotServing
                } as i32;
            }
            Ok(Err(err)) => {
                status.state = ServingState::Unreachable as i32;
                status.detail = describe(&err);
            }
            Err(_) => {
                status.state = ServingState::Unreachable as i32;
                status.detail = format!("no answer within {} s", PROBE_TIMEOUT.as_secs());
            }
        }
        status
    }
}

/// The status message and its causes on one line (connection errors hide the cause, such as
/// an identity mismatch, in the source chain).
fn describe(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
