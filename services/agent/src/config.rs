use std::path::PathBuf;

use cms_kit::authz::AccessSettings;
use cms_kit::client::UpstreamSettings;
use cms_kit::db::DatabaseSettings;
use cms_kit::server::ServerSettings;
use cms_kit::service::ServiceConfig;
use cms_kit::telemetry::TelemetrySettings;
use cms_kit::tls::TlsSettings;
use serde::Deserialize;

/// Configuration of the card agent (TOML file + `CMS_AGENT__…` environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the agent's SQLite file (pending PUK rotations and the like).
    pub data_dir: PathBuf,
    /// The agent's local API (for the local UI and CLI).
    pub server: ServerSettings,
    pub tls: TlsSettings,
    #[serde(default)]
    pub access: AccessSettings,
    #[serde(default)]
    pub database: DatabaseSettings,
    /// The gateway this agent links to. Unset: the agent works offline only.
    #[serde(default)]
    pub gateway: Option<UpstreamSettings>,
    #[serde(default)]
    pub link: LinkSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSettings {
    /// How often the agent tells the gateway it is alive.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// Upper bound of the back-off between reconnection attempts.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl Default for LinkSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: default_heartbeat_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

fn default_heartbeat_ms() -> u64 {
    15_000
}
fn default_max_backoff_ms() -> u64 {
    10_000
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerSettings {
        &self.server
    }

    fn telemetry(&self) -> &TelemetrySettings {
        &self.telemetry
    }
}
