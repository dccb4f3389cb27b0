//! Key custody: master keys, per-card diversification, cryptograms and their audit.
//!
//! This is the service skeleton (config, storage, mTLS serving, status); sealing, master keys
//! and cryptograms answer UNIMPLEMENTED until the custody issue lands.

mod config;
mod error;

pub use config::Config;
pub use error::Error;

use cms_kit::metrics::Metrics;
use cms_kit::ops::Readiness;
use cms_kit::server::{Listeners, Serve};
use cms_kit::shutdown::Shutdown;
use cms_kit::tls::TlsSource;
use cms_proto::custody::v1::custody_service_server::{CustodyService, CustodyServiceServer};
use cms_proto::custody::v1::{Backend, GetStatusRequest, GetStatusResponse, SealState};

pub const NAME: &str = "custody";

/// The CustodyService implementation.
#[derive(Debug)]
pub struct Custody {
    _db: sea_orm::DatabaseConnection,
}

#[tonic::async_trait]
impl CustodyService for Custody {
    async fn get_status(
        &self,
        _request: tonic::Request<GetStatusRequest>,
    ) -> Result<tonic::Response<GetStatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(GetStatusResponse {
            seal_state: SealState::Uninitialised as i32,
            backend: Backend::Soft as i32,
            detail: "no key-encryption key yet".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }))
    }
}

/// Serves the custody API on `listeners` until `shutdown`.
pub async fn run(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let tls = TlsSource::load(config.tls)?;
    let db = cms_kit::db::connect(&config.database, &config.data_dir, NAME).await?;
    let routes = tonic::service::Routes::new(CustodyServiceServer::new(Custody { _db: db }));
    let spec = Serve {
        name: NAME,
        version: env!("CARGO_PKG_VERSION"),
        grpc_services: &["cms.custody.v1.CustodyService"],
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
