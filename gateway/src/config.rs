use cms_kit::authz::AccessSettings;
use cms_kit::client::UpstreamSettings;
use cms_kit::server::ServerSettings;
use cms_kit::service::ServiceConfig;
use cms_kit::telemetry::TelemetrySettings;
use cms_kit::tls::TlsSettings;
use serde::Deserialize;

/// Configuration of the gateway (TOML file + `CMS_GATEWAY__…` environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSettings,
    pub tls: TlsSettings,
    /// Who may connect at all: operators, agents and services (`…/*` patterns allowed).
    #[serde(default)]
    pub access: AccessSettings,
    pub backends: Backends,
    #[serde(default)]
    pub agent_link: AgentLinkSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

/// The services behind the gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    pub template: UpstreamSettings,
    pub directory: UpstreamSettings,
    pub custody: UpstreamSettings,
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

impl ServiceConfig for Config {
    fn server(&self) -> &ServerSettings {
        &self.server
    }

    fn telemetry(&self) -> &TelemetrySettings {
        &self.telemetry
    }
}
