//! The template service: card templates and their unblock and PIN policies.
//!
//! This is the service skeleton (config, storage, mTLS serving); the template API itself
//! answers UNIMPLEMENTED until the template issue lands.

mod config;
mod error;

pub use config::Config;
pub use error::Error;

use cms_kit::metrics::Metrics;
use cms_kit::ops::Readiness;
use cms_kit::server::{Listeners, Serve};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::template::v1::template_service_server::{TemplateService, TemplateServiceServer};

pub const NAME: &str = "template";

/// The TemplateService implementation.
#[derive(Debug)]
pub struct Templates {
    _db: sea_orm::DatabaseConnection,
}

#[tonic::async_trait]
impl TemplateService for Templates {}

/// Serves the template API on `listeners` until `shutdown`.
pub async fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let tls = TlsSource::load(config.tls)?;
    let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
    let routes = tonic::service::Routes::new(TemplateServiceServer::new(Templates { _db: db }));
    let spec = Serve {
        name: NAME,
        version: env!("CARGO_PKG_VERSION"),
        grpc_services: &["cms.template.v1.TemplateService"],
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
