//! The auth gateway: the one entry point for operators' clients, agents and other services.
//! It authenticates every caller by its mTLS identity, runs the workflows, and talks to the
//! template, directory and custody services on their behalf.

mod admin;
mod agents;
pub mod approvals;
pub mod authz;
mod backends;
pub mod caller;
mod config;
pub mod db;
mod decisions;
mod downstream;
mod error;
mod forward;
pub mod helpdesk;
mod key_references;
mod operators;
mod ratelimit;
mod roles;

pub use approvals::Approvals;
pub use config::{AgentLinkSettings, Backends as BackendSettings, Config, OperatorSettings};
pub use error::Error;
pub use helpdesk::{Helpdesk, Workflow};
pub use roles::Role;

use std::sync::Arc;
use std::time::Duration;

use cms_kit::metrics::Metrics;
use cms_kit::ops::Readiness;
use cms_kit::server::{Listeners, Serve};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::gateway::v1::admin_service_server::AdminServiceServer;
use cms_proto::gateway::v1::agent_link_service_server::AgentLinkServiceServer;
use cms_proto::gateway::v1::approval_service_server::ApprovalServiceServer;
use cms_proto::gateway::v1::helpdesk_service_server::HelpdeskServiceServer;

pub const NAME: &str = "gateway";

/// Serves the gateway on `listeners` until `shutdown`.
///
/// Boxed so that the service's async code is compiled once, in this crate: a binary or test
/// that awaited the bare future would compile all of it again (minutes per binary).
pub fn run(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> cms_kit::service::ServiceFuture<Error> {
    Box::pin(serve_gateway(config, listeners, shutdown))
}

async fn serve_gateway(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let cache_ttl = config.operators.cache_ttl()?;
    let db = db::open(&config).await?;
    let tls = TlsSource::load(config.tls)?;
    let backends = backends::Backends::connect(&config.backends, &tls)?;
    let operators = Arc::new(operators::OperatorAccounts::new(
        backends.directory.channel.clone(),
        cache_ttl,
    ));
    let workflow = Arc::new(Workflow {
        directory: admin::DirectoryClient::new(backends.directory.channel.clone()),
        template: admin::TemplateClient::new(backends.template.channel.clone()),
        custody: admin::CustodyClient::new(backends.custody.channel.clone()),
        operators: operators.clone(),
        db,
        settings: config.helpdesk,
    });
    let registry = agents::Registry::default();
    let listen = listeners
        .grpc
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin = admin::Admin {
        custody: admin::CustodyClient::new(backends.custody.channel.clone()),
        template: admin::TemplateClient::new(backends.template.channel.clone()),
        directory: admin::DirectoryClient::new(backends.directory.channel.clone()),
        operators,
        backends,
        agents: registry.clone(),
        tls: tls.clone(),
        listen,
        stale_after: Duration::from_millis(config.agent_link.stale_after_ms),
    };
    let link = agents::AgentLink {
        registry,
        settings: config.agent_link.clone(),
    };
    let routes = tonic::service::Routes::new(AdminServiceServer::new(admin))
        .add_service(AgentLinkServiceServer::new(link))
        .add_service(HelpdeskServiceServer::new(Helpdesk::new(workflow.clone())))
        .add_service(ApprovalServiceServer::new(Approvals::new(workflow)));
    let spec = Serve {
        name: NAME,
        version: env!("CARGO_PKG_VERSION"),
        grpc_services: &[
            "cms.gateway.v1.AdminService",
            "cms.gateway.v1.AgentLinkService",
            "cms.gateway.v1.HelpdeskService",
            "cms.gateway.v1.ApprovalService",
        ],
        descriptors: cms_proto::FILE_DESCRIPTOR_SET,
        settings: config.server,
        access: config.access,
        tls,
        readiness: Readiness::new("starting"),
        metrics: Metrics::new(NAME),
    };
    cms_kit::server::serve(spec, routes, listeners, shutdown).await?;
    Ok(())
}
