//! The card agent beside the readers: a local API for the UI and CLI, and an outbound link to
//! the gateway through which the gateway can drive a card (online unblock).
//!
//! This is the agent skeleton (config, local API, gateway link); PC/SC, card profiles and the
//! virtual card land with the agent issue.

mod config;
mod error;
mod link;

pub use config::{Config, LinkSettings};
pub use error::Error;

use cms_kit::metrics::Metrics;
use cms_kit::ops::Readiness;
use cms_kit::server::{Listeners, Serve};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use cms_proto::agent::v1::{
    GetAgentStatusRequest, GetAgentStatusResponse, ListReadersRequest, ListReadersResponse,
};
use cms_proto::gateway::v1::Hello;

pub const NAME: &str = "agent";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The AgentService implementation.
pub struct Agent {
    agent_id: String,
    gateway_address: String,
    link: link::LinkState,
    _db: sea_orm::DatabaseConnection,
}

#[tonic::async_trait]
impl AgentService for Agent {
    async fn get_agent_status(
        &self,
        _request: tonic::Request<GetAgentStatusRequest>,
    ) -> Result<tonic::Response<GetAgentStatusResponse>, tonic::Status> {
        let (connected, since) = self.link.get();
        Ok(tonic::Response::new(GetAgentStatusResponse {
            agent_id: self.agent_id.clone(),
            version: VERSION.into(),
            gateway_connected: connected,
            gateway_address: self.gateway_address.clone(),
            connection_changed_at: Some(since.into()),
            supported_profiles: Vec::new(),
        }))
    }

    async fn list_readers(
        &self,
        _request: tonic::Request<ListReadersRequest>,
    ) -> Result<tonic::Response<ListReadersResponse>, tonic::Status> {
        Ok(tonic::Response::new(ListReadersResponse::default()))
    }
}

/// The agent id is the SPIFFE path after `/cms/`: `agent` or `agent/<name>`.
fn agent_id(tls: &TlsSource) -> Result<String, Error> {
    let id = tls.identity();
    let path = id.path();
    match path.strip_prefix("/cms/") {
        Some(rest) if rest == "agent" || rest.starts_with("agent/") => Ok(rest.to_owned()),
        _ => Err(Error::AgentId(format!(
            "the agent certificate's SPIFFE ID {id} is not under /cms/agent"
        ))),
    }
}

/// Serves the agent's local API on `listeners` and keeps the gateway link up until
/// `shutdown`.
///
/// Boxed so that the service's async code is compiled once, in this crate: a binary or test
/// that awaited the bare future would compile all of it again (minutes per binary).
pub fn run(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> cms_kit::service::ServiceFuture<Error> {
    Box::pin(serve_agent(config, listeners, shutdown))
}

async fn serve_agent(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let tls = TlsSource::load(config.tls)?;
    let agent_id = agent_id(&tls)?;
    let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
    let state = link::LinkState::default();
    let link_task = match &config.gateway {
        Some(gateway) => {
            let link = link::Link {
                channel: cms_kit::client::channel(gateway, tls.clone())?,
                hello: Hello {
                    agent_id: agent_id.clone(),
                    version: VERSION.into(),
                    hostname: hostname(),
                    ..Default::default()
                },
                settings: config.link.clone(),
                state: state.clone(),
            };
            Some(tokio::spawn(link.run(shutdown.clone())))
        }
        None => {
            tracing::info!("no [gateway] configured: offline mode");
            None
        }
    };
    let agent = Agent {
        agent_id,
        gateway_address: config
            .gateway
            .as_ref()
            .map(|g| g.address.clone())
            .unwrap_or_default(),
        link: state,
        _db: db,
    };
    let routes = tonic::service::Routes::new(AgentServiceServer::new(agent));
    let spec = Serve {
        name: NAME,
        version: VERSION,
        grpc_services: &["cms.agent.v1.AgentService"],
        descriptors: cms_proto::FILE_DESCRIPTOR_SET,
        settings: config.server,
        access: config.access,
        tls,
        readiness: Readiness::new("starting"),
        metrics: Metrics::new(NAME),
    };
    let served = cms_kit::server::serve(spec, routes, listeners, shutdown).await;
    if let Some(task) = link_task {
        task.abort();
    }
    served?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
