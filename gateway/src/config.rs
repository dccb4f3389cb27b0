use std::path::PathBuf;

use cms_kit::SpiffeId;
use cms_kit::authz::AccessSettings;
use cms_kit::client::UpstreamSettings;
use cms_kit::db::DatabaseSettings;
use cms_kit::server::ServerSettings;
use cms_kit::telemetry::TelemetrySettings;
use cms_kit::tls::TlsSettings;
use serde::Deserialize;

/// Configuration of the gateway (TOML file + `CMS_GATEWAY__…` environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the SQLite file `gateway.sqlite3` (when `database.url` is unset).
    pub data_dir: PathBuf,
    /// The gateway's own database: approvals, one-time codes, rate-limit windows, decisions.
    /// Replicas of the gateway must share it (PostgreSQL).
    #[serde(default)]
    pub database: DatabaseSettings,
    pub server: ServerSettings,
    pub tls: TlsSettings,
    /// Who may connect at all: operators, agents and services (`…/*` patterns allowed).
    #[serde(default)]
    pub access: AccessSettings,
    pub backends: Backends,
    #[serde(default)]
    pub agent_link: AgentLinkSettings,
    #[serde(default)]
    pub operators: OperatorSettings,
    #[serde(default)]
    pub helpdesk: crate::helpdesk::Settings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

/// The services behind the gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    pub template: UpstreamSettings,
    pub directory: UpstreamSettings,
    pub custody: CustodyUpstream,
}

/// Custody: the address every call goes to (a Kubernetes Service routes it to the active
/// instance), and every instance behind it, each of which gets the Unseal shares and Seal so
/// that a standby taking over after a failover is unsealed already.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustodyUpstream {
    /// `host:port` of the custody Service (or of the one instance).
    pub address: String,
    /// The SPIFFE ID every custody instance's certificate must carry.
    pub identity: SpiffeId,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// `host:port` of every custody instance; a host name resolving to several addresses (a
    /// headless Service) stands for all of them, resolved at each Unseal and Seal. Each
    /// instance's certificate is checked for the host name of `address`. Default: `address`
    /// alone.
    #[serde(default)]
    pub instances: Vec<String>,
}

fn default_connect_timeout_ms() -> u64 {
    3_000
}

impl CustodyUpstream {
    /// The settings of the Service (or of one instance at `address`).
    pub fn upstream(&self, address: &str) -> UpstreamSettings {
        UpstreamSettings {
            address: address.to_owned(),
            identity: self.identity.clone(),
            connect_timeout_ms: self.connect_timeout_ms,
        }
    }

    /// The configured instance addresses (`address` when none are listed).
    pub fn instance_addresses(&self) -> Vec<String> {
        if self.instances.is_empty() {
            vec![self.address.clone()]
        } else {
            self.instances.clone()
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLinkSettings {
    /// How long a new link may take to send its Hello.
    #[serde(default = "default_hello_timeout_ms")]
    pub hello_timeout_ms: u64,
    /// An agent silent for longer than this is reported stale.
    #[serde(default = "default_stale_after_ms")]
    pub stale_after_ms: u64,
}

impl Default for AgentLinkSettings {
    fn default() -> Self {
        Self {
            hello_timeout_ms: default_hello_timeout_ms(),
            stale_after_ms: default_stale_after_ms(),
        }
    }
}

fn default_hello_timeout_ms() -> u64 {
    10_000
}
fn default_stale_after_ms() -> u64 {
    45_000
}

/// How the gateway reads operator accounts from the directory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSettings {
    /// How long the operator accounts read from the directory are reused; a change in the
    /// directory (a new, disabled or re-roled operator) takes effect within this time.
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// PEM bundle of CAs (the enterprise's own, say) whose client certificates the gateway's
    /// port accepts without a SPIFFE ID. Such a caller is an operator only when the directory
    /// binds its certificate to an active operator account (`cmsctl operators create
    /// --bind-cert`); it never gets service or agent rights.
    #[serde(default)]
    pub client_ca_file: Option<std::path::PathBuf>,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        Self {
            cache_ttl_ms: default_cache_ttl_ms(),
            client_ca_file: None,
        }
    }
}

fn default_cache_ttl_ms() -> u64 {
    10_000
}

impl OperatorSettings {
    pub const CACHE_TTL_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=300_000;

    /// The cache lifetime, refused outside `CACHE_TTL_RANGE_MS` (0 would ask the directory on
    /// every call; hours would keep a disabled operator working).
    pub fn cache_ttl(&self) -> Result<std::time::Duration, crate::Error> {
        if Self::CACHE_TTL_RANGE_MS.contains(&self.cache_ttl_ms) {
            Ok(std::time::Duration::from_millis(self.cache_ttl_ms))
        } else {
            Err(crate::Error::Config(format!(
                "operators.cache_ttl_ms = {} is outside {}..={}",
                self.cache_ttl_ms,
                Self::CACHE_TTL_RANGE_MS.start(),
                Self::CACHE_TTL_RANGE_MS.end()
            )))
        }
    }
}

cms_kit::impl_service_config!(Config);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_systemd_example_parses_and_cache_ttl_is_bounded() {
        let example = include_str!("../../deploy/systemd/config/gateway.toml");
        let config: Config = cms_kit::config::from_toml(example).unwrap();
        assert_eq!(
            config.operators.cache_ttl().unwrap(),
            std::time::Duration::from_secs(10)
        );
        for bad in [0, 99, 300_001] {
            let err = OperatorSettings {
                cache_ttl_ms: bad,
                client_ca_file: None,
            }
            .cache_ttl()
            .unwrap_err();
            assert!(err.to_string().contains("operators.cache_ttl_ms"), "{err}");
        }
    }
}
