use std::path::PathBuf;

use cms_kit::authz::{AccessSettings, IdentityPattern};
use cms_kit::db::DatabaseSettings;
use cms_kit::server::ServerSettings;
use cms_kit::service::ServiceConfig;
use cms_kit::telemetry::TelemetrySettings;
use cms_kit::tls::TlsSettings;
use serde::Deserialize;

/// Configuration of key custody (TOML file + `CMS_CUSTODY__…` environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of custody's SQLite file (when `database.url` is unset).
    pub data_dir: PathBuf,
    pub server: ServerSettings,
    pub tls: TlsSettings,
    /// Who may connect at all (see also `callers` for what each may do).
    #[serde(default)]
    pub access: AccessSettings,
    /// What each caller may do: which key references it may use, whether it may administer.
    #[serde(default)]
    pub callers: Vec<CallerScope>,
    #[serde(default)]
    pub database: DatabaseSettings,
    #[serde(default)]
    pub seal: SealSettings,
    #[serde(default)]
    pub guards: GuardSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

/// The rights of one caller identity (or pattern).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerScope {
    pub identity: IdentityPattern,
    /// Master-key references this caller may request cryptograms with; `"*"` for all.
    #[serde(default)]
    pub key_references: Vec<String>,
    /// Seal, unseal and master-key lifecycle, audit queries.
    #[serde(default)]
    pub admin: bool,
}

impl CallerScope {
    pub fn may_use(&self, reference: &str) -> bool {
        self.key_references
            .iter()
            .any(|r| r == "*" || r == reference)
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealSettings {
    /// Development only: keep the key-encryption key in this file (created on first start)
    /// and unseal from it at start. Production leaves it unset and unseals with custodian
    /// shares (`cmsctl custody unseal`).
    #[serde(default)]
    pub dev_seal_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSettings {
    /// Cryptograms per card within `per_card_window_secs`.
    #[serde(default = "default_per_card_limit")]
    pub per_card_limit: u32,
    #[serde(default = "default_day")]
    pub per_card_window_secs: u64,
    /// A (card, challenge) pair seen within this window is refused.
    #[serde(default = "default_day")]
    pub replay_window_secs: u64,
    /// Sustained cryptogram requests per second per caller, and the burst above it.
    #[serde(default = "default_caller_rate")]
    pub caller_rate_per_sec: f64,
    #[serde(default = "default_caller_burst")]
    pub caller_burst: u32,
    /// Cryptogram requests in progress at once; beyond it requests are shed with
    /// RESOURCE_EXHAUSTED instead of queueing.
    #[serde(default = "default_max_outstanding")]
    pub max_outstanding: usize,
    /// Test hook: make the start-up self-test fail (custody then refuses all work).
    #[serde(default)]
    pub fail_self_test: bool,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            per_card_limit: default_per_card_limit(),
            per_card_window_secs: default_day(),
            replay_window_secs: default_day(),
            caller_rate_per_sec: default_caller_rate(),
            caller_burst: default_caller_burst(),
            max_outstanding: default_max_outstanding(),
            fail_self_test: false,
        }
    }
}

fn default_per_card_limit() -> u32 {
    5
}
fn default_day() -> u64 {
    86_400
}
fn default_caller_rate() -> f64 {
    200.0
}
fn default_caller_burst() -> u32 {
    400
}
fn default_max_outstanding() -> usize {
    1_024
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerSettings {
        &self.server
    }

    fn telemetry(&self) -> &TelemetrySettings {
        &self.telemetry
    }
}
