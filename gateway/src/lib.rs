//! The auth gateway: the one entry point for operators' clients, agents and other services.
//! It authenticates every caller by its mTLS identity, runs the workflows, and talks to the
//! template, directory and custody services on their behalf.

mod admin;
mod agents;
mod backends;
pub mod caller;
mod config;
mod error;
mod forward;
mod key_references;
mod operators;
mod roles;

pub use config::{AgentLinkSettings, Backends as BackendSettings, Config, OperatorSettings};
pub use error::Error;
pub use roles::Role;

use std::time::Duration;

use cms_kit::server::{Listeners, Server};
use cms_kit::service::{Program, ServiceFuture};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::gateway::v1::admin_service_server::AdminServiceServer;
use cms_proto::gateway::v1::agent_link_service_server::AgentLinkServiceServer;

pub const NAME: &str = "gateway";

/// The `cms-gateway` binary (no database yet: `--migrate-only` is refused).
pub const PROGRAM: Program<Config, Error> = Program {
    name: NAME,
    run,
    migrate: None,
};

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
    let tls = TlsSource::load(config.tls)?;
    let backends = backends::Backends::connect(&config.backends, &tls)?;
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
        operators: operators::OperatorAccounts::new(backends.directory.channel.clone(), cache_ttl),
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
    Server::new(NAME, config.server, config.access, tls)
        .add_service(AdminServiceServer::new(admin))
        .add_service(AgentLinkServiceServer::new(link))
        .serve(listeners, shutdown)
        .await?;
    Ok(())
}
