//! AdminService: system administration by operators. Today: the system status.

use std::sync::Arc;
use std::time::Duration;

use cms_kit::tls::TlsSource;
use cms_proto::common::v1::ServingState;
use cms_proto::gateway::v1::admin_service_server::AdminService;
use cms_proto::gateway::v1::{GetSystemStatusRequest, GetSystemStatusResponse, ServiceStatus};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::agents::Registry;
use crate::backends::Backends;
use crate::caller::require_operator;

pub struct Admin {
    pub backends: Backends,
    pub agents: Registry,
    pub tls: Arc<TlsSource>,
    pub listen: String,
    pub stale_after: Duration,
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_system_status(
        &self,
        request: Request<GetSystemStatusRequest>,
    ) -> Result<Response<GetSystemStatusResponse>, Status> {
        require_operator(&request)?;
        let probes = self.backends.all().map(|backend| {
            let span = tracing::info_span!("probe", backend = backend.name);
            backend.probe().instrument(span)
        });
        let [template, directory, custody] = probes;
        let (template, directory, custody) = tokio::join!(template, directory, custody);

        let gateway_identity = self.tls.identity().to_string();
        let mut services = vec![ServiceStatus {
            name: "gateway".into(),
            address: self.listen.clone(),
            identity: gateway_identity.clone(),
            state: ServingState::Serving as i32,
            version: VERSION.into(),
            checked_at: Some(std::time::SystemTime::now().into()),
            ..Default::default()
        }];
        services.extend([template, directory, custody]);
        let agents = self.agents.list(self.stale_after);
        for view in &agents {
            services.push(ServiceStatus {
                name: "agent".into(),
                address: view.remote.map(|a| a.to_string()).unwrap_or_default(),
                identity: view.agent.identity.clone(),
                state: if view.stale {
                    ServingState::Degraded
                } else {
                    ServingState::Serving
                } as i32,
                version: view.agent.version.clone(),
                detail: if view.stale {
                    "connected, but silent longer than agent_link.stale_after_ms".into()
                } else {
                    format!("linked agent {}", view.agent.agent_id)
                },
                checked_at: view.agent.last_heartbeat_at,
                latency_ms: 0,
            });
        }
        let overall = services
            .iter()
            .map(|s| s.state)
            .max()
            .unwrap_or(ServingState::Unspecified as i32);
        Ok(Response::new(GetSystemStatusResponse {
            services,
            agents: agents.into_iter().map(|v| v.agent).collect(),
            gateway_version: VERSION.into(),
            gateway_identity,
            overall_state: overall,
        }))
    }
}
