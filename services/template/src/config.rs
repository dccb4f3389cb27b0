use std::path::PathBuf;

use cms_kit::authz::AccessSettings;
use cms_kit::db::DatabaseSettings;
use cms_kit::server::ServerSettings;
use cms_kit::telemetry::TelemetrySettings;
use cms_kit::tls::TlsSettings;
use serde::Deserialize;

/// Configuration of the template service (TOML file + `CMS_TEMPLATE__…` environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the SQLite file (when `database.url` is unset).
    pub data_dir: PathBuf,
    pub server: ServerSettings,
    pub tls: TlsSettings,
    #[serde(default)]
    pub access: AccessSettings,
    #[serde(default)]
    pub database: DatabaseSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

cms_kit::impl_service_config!(Config);
