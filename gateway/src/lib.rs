//! The auth gateway: the one entry point for operators' clients, agents and other services.
//! It authenticates every caller by its mTLS identity, runs the workflows, and talks to the
//! template, directory and custody services on their behalf.

mod admin;
mod admin_scope;
mod agents;
pub mod approvals;
pub mod authz;
mod backends;
mod bound_certs;
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
use cms_kit::tls::{BoundBundle, TlsSource};
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

/// What a caller known only by a bound certificate may reach (with the console's pages):
/// operator work, each RPC of which finds the operator's account first. Not the agent link.
const BOUND_CERTIFICATE_PATHS: &[&str] = &[
    "/cms.gateway.v1.HelpdeskService/",
    "/cms.gateway.v1.ApprovalService/",
    "/cms.gateway.v1.AdminService/",
    "/api/v1/",
];

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
    let bound_bundle = config
        .operators
        .client_ca_file
        .clone()
        .map(|path| BoundBundle {
            key: "operators.client_ca_file",
            path,
        });
    let accepts_bound = bound_bundle.is_some();
    let tls = TlsSource::load_with_bound_bundle(config.tls, bound_bundle)?;
    let backends = backends::Backends::connect(&config.backends, &tls)?;
    let mut operators =
        operators::OperatorAccounts::new(backends.directory.channel.clone(), cache_ttl);
    if accepts_bound {
        operators = operators.with_bound_certificates(backends.directory.channel.clone());
    }
    let operators = Arc::new(operators);
    let workflow = Arc::new(Workflow {
        directory: admin::DirectoryClient::new(backends.directory.channel.clone()),
        template: admin::TemplateClient::new(backends.template.channel.clone()),
        custody: admin::CustodyClient::new(backends.custody.channel.clone()),
        operators: operators.clone(),
        db: db.clone(),
        writes: db::group_commit::GroupCommit::start(db.clone()),
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
        .admit_bound_certificates(BOUND_CERTIFICATE_PATHS.iter().copied())
        .admit_bound_certificates(console::page_paths())
        .serve(listeners, shutdown)
        .await?;
    Ok(())
}
