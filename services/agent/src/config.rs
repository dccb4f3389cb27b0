use std::path::PathBuf;

use cms_kit::authz::AccessSettings;
use cms_kit::client::UpstreamSettings;
use cms_kit::server::ServerSettings;
use cms_kit::telemetry::TelemetrySettings;
use cms_kit::tls::TlsSettings;
use serde::Deserialize;

/// Configuration of the card agent (TOML file + `CMS_AGENT__…` environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The agent's own files (the local API socket by default).
    pub data_dir: PathBuf,
    /// The agent's local API (for the local UI and CLI).
    pub server: ServerSettings,
    pub tls: TlsSettings,
    #[serde(default)]
    pub access: AccessSettings,
    /// The gateway this agent links to. Unset: the agent works offline only.
    #[serde(default)]
    pub gateway: Option<UpstreamSettings>,
    #[serde(default)]
    pub link: LinkSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// The local API on a Unix domain socket (desktop app, CLI, logon-screen plugin).
    #[serde(default)]
    pub local_api: LocalApiSettings,
    /// Readers, card sessions and the PIN policy used when nobody passes one.
    #[serde(default)]
    pub cards: CardSettings,
}

/// `[local_api]`: the Unix domain socket. Whoever can open it can drive the cards, so it is
/// created with `mode` and handed to `group` (the local users allowed to unblock cards).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalApiSettings {
    /// Serve the local API on the socket at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Socket path; default `<data_dir>/agent.sock` (systemd: `/run/cms-agent/agent.sock`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Group that owns the socket (name or numeric id); unset: the agent's own group.
    #[serde(default)]
    pub group: Option<String>,
    /// Permission bits of the socket, as an octal string ("0660").
    #[serde(default = "default_socket_mode")]
    pub mode: String,
}

impl Default for LocalApiSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: None,
            group: None,
            mode: default_socket_mode(),
        }
    }
}

impl LocalApiSettings {
    /// The socket path, resolved against `data_dir`.
    pub fn socket_path(&self, data_dir: &std::path::Path) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| data_dir.join("agent.sock"))
    }

    /// The mode bits; an error names the key.
    pub fn mode_bits(&self) -> Result<u32, String> {
        let digits = self.mode.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(bits) if bits <= 0o777 => Ok(bits),
            _ => Err(format!(
                "local_api.mode: {:?} is not an octal permission such as \"0660\"",
                self.mode
            )),
        }
    }
}

/// `[cards]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSettings {
    /// How long an offline challenge (and the exclusive card session holding it) stays open
    /// waiting for the response.
    #[serde(default = "default_challenge_timeout_ms")]
    pub challenge_timeout_ms: u64,
    /// PIN policy applied when a request carries none (offline, no template at hand).
    #[serde(default)]
    pub pin_policy: Option<PinPolicySettings>,
    /// A `cms-vcard new` card file served from an in-process reader instead of PC/SC
    /// (development and demos without pcscd). Unset: the PC/SC readers.
    #[serde(default)]
    pub virtual_card: Option<PathBuf>,
}

impl Default for CardSettings {
    fn default() -> Self {
        Self {
            challenge_timeout_ms: default_challenge_timeout_ms(),
            pin_policy: None,
            virtual_card: None,
        }
    }
}

/// `[cards.pin_policy]`: the fields of the template's PinPolicy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinPolicySettings {
    pub min_length: u32,
    pub max_length: u32,
    /// Any of "digit", "lower", "upper", "symbol".
    #[serde(default = "default_classes")]
    pub allowed_classes: Vec<PinClass>,
    #[serde(default)]
    pub required_classes: Vec<PinClass>,
    #[serde(default)]
    pub forbid_trivial: bool,
    #[serde(default)]
    pub max_repeated_characters: u32,
    #[serde(default)]
    pub max_sequence_length: u32,
}

/// A character class of a PIN policy.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PinClass {
    Digit,
    Lower,
    Upper,
    Symbol,
}

impl PinPolicySettings {
    /// The same policy as the template service's message.
    pub fn to_proto(&self) -> cms_proto::template::v1::PinPolicy {
        use cms_proto::template::v1::{CharacterClass, PinPolicy};
        let class = |c: &PinClass| match c {
            PinClass::Digit => CharacterClass::Digit as i32,
            PinClass::Lower => CharacterClass::Lower as i32,
            PinClass::Upper => CharacterClass::Upper as i32,
            PinClass::Symbol => CharacterClass::Symbol as i32,
        };
        PinPolicy {
            min_length: self.min_length,
            max_length: self.max_length,
            allowed_classes: self.allowed_classes.iter().map(class).collect(),
            required_classes: self.required_classes.iter().map(class).collect(),
            forbid_trivial: self.forbid_trivial,
            max_repeated_characters: self.max_repeated_characters,
            max_sequence_length: self.max_sequence_length,
            must_differ_from_previous: false,
            pin_tries: 0,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_socket_mode() -> String {
    "0660".into()
}
fn default_challenge_timeout_ms() -> u64 {
    300_000
}
fn default_classes() -> Vec<PinClass> {
    vec![
        PinClass::Digit,
        PinClass::Lower,
        PinClass::Upper,
        PinClass::Symbol,
    ]
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

cms_kit::impl_service_config!(Config);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_systemd_example_config_is_valid() {
        let text = include_str!("../../../deploy/systemd/config/agent.toml");
        let config: Config = cms_kit::config::from_toml(text).expect("example config");
        assert_eq!(
            config.local_api.socket_path(&config.data_dir),
            PathBuf::from("/run/cms-agent/agent.sock")
        );
        assert_eq!(config.local_api.mode_bits(), Ok(0o660));
        // With the commented-out policy enabled, it parses too.
        let with_policy = text
            .replace("# [cards.pin_policy]", "[cards.pin_policy]")
            .replace("# min_length", "min_length")
            .replace("# max_length", "max_length")
            .replace("# allowed_classes", "allowed_classes")
            .replace("# forbid_trivial", "forbid_trivial");
        let config: Config = cms_kit::config::from_toml(&with_policy).expect("with a policy");
        let policy = config.cards.pin_policy.expect("policy").to_proto();
        assert_eq!((policy.min_length, policy.max_length), (6, 8));
    }
}
