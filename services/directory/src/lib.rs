//! The directory service: users, operators, credentials (cards), self-service enrolment, search.
//!
//! This is the service skeleton (config, storage, mTLS serving); the directory API itself
//! answers UNIMPLEMENTED until the directory issue lands.

mod config;
mod error;

pub use config::Config;
pub use error::Error;

use cms_kit::metrics::Metrics;
use cms_kit::ops::Readiness;
use cms_kit::server::{Listeners, Serve};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::directory::v1::directory_service_server::{
    DirectoryService, DirectoryServiceServer,
};

pub const NAME: &str = "directory";

/// The DirectoryService implementation.
#[derive(Debug)]
pub struct Directory {
    _db: sea_orm::DatabaseConnection,
}

#[tonic::async_trait]
impl DirectoryService for Directory {}

/// Serves the directory API on `listeners` until `shutdown`.
pub async fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let tls = TlsSource::load(config.tls)?;
    let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
    let routes = tonic::service::Routes::new(DirectoryServiceServer::new(Directory { _db: db }));
    let spec = Serve {
        name: NAME,
        version: env!("CARGO_PKG_VERSION"),
        grpc_services: &["cms.directory.v1.DirectoryService"],
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
