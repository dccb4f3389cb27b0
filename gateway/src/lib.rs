//! The auth gateway: the one entry point for operators' clients, agents and other services.
//! It authenticates every caller by its mTLS identity, runs the workflows, and talks to the
//! template, directory and custody services on their behalf.

mod admin;
mod admin_scope;
mod agents;
pub mod approvals;
pub mod authz;
mod backends;
pub mod caller;
mod config;
mod console;
mod custody_instances;
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

use cms_kit::server::{Listeners, Server};
use cms_kit::service::{Program, ServiceFuture};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::gateway::v1::admin_service_server::AdminServiceServer;
use cms_proto::gateway::v1::agent_link_service_server::AgentLinkServiceServer;
use cms_proto::gateway::v1::approval_service_server::ApprovalServiceServer;
use cms_proto::gateway::v1::helpdesk_service_server::HelpdeskServiceServer;
use tonic::service::Routes;

pub const NAME: &str = "gateway";

/// The `cms-gateway` binary: serves, or only migrates its database (`--migrate-only`).
pub const PROGRAM: Program<Config, Error> = Program {
    name: NAME,
    run,
    migrate: Some(migrate),
};

/// Applies pending migrations of the gateway's database and returns.
pub fn migrate(config: Config) -> ServiceFuture<Error> {
    Box::pin(async move {
        db::open(&config).await?.close().await?;
        Ok(())
    })
}

/// Serves the gateway on `listeners` until `shutdown`.
///
/// Boxed so that the service's async code is compiled once, in this crate: a binary or test
/// that awaited the bare future would compile all of it again (minutes per binary).
pub fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> ServiceFuture<Error> {
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
        db: db.clone(),
        settings: config.helpdesk,
        templates: Default::default(),
    });
    let registry = agents::Registry::default();
    let listen = listeners
        .grpc
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin = admin::Admin {
        custody: admin::CustodyClient::new(backends.custody.channel.clone()),
        custody_instances: custody_instances::CustodyInstances::new(
            config.backends.custody.clone(),
            tls.clone(),
            backends.custody.channel.clone(),
        ),
        template: admin::TemplateClient::new(backends.template.channel.clone()),
        directory: admin::DirectoryClient::new(backends.directory.channel.clone()),
        operators,
        backends,
        agents: registry.clone(),
        tls: tls.clone(),
        listen,
        stale_after: Duration::from_millis(config.agent_link.stale_after_ms),
        db,
    };
    let link = agents::AgentLink {
        registry,
        settings: config.agent_link.clone(),
    };
    // One implementation, two transports: the gRPC servers and the console share these.
    let admin = Arc::new(admin);
    let helpdesk = Arc::new(Helpdesk::new(workflow.clone()));
    let approvals = Arc::new(Approvals::new(workflow));
    let console = console::Services {
        helpdesk: helpdesk.clone(),
        approvals: approvals.clone(),
        audit: console::audit_query(admin.clone()),
    };
    Server::new(NAME, config.server, config.access, tls)
        .add_service(AdminServiceServer::from_arc(admin))
        .add_service(AgentLinkServiceServer::new(link))
        .add_service(HelpdeskServiceServer::from_arc(helpdesk))
        .add_service(ApprovalServiceServer::from_arc(approvals))
        .map_routes(|routes| Routes::from(console::mount(routes.into_axum_router(), console)))
        .serve(listeners, shutdown)
        .await?;
    Ok(())
}
