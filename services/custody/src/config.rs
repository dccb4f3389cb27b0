use std::path::PathBuf;

use cms_kit::authz::{AccessSettings, IdentityPattern};
use cms_kit::db::DatabaseSettings;
use cms_kit::server::ServerSettings;
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
    /// Where master keys live: `soft` (default) or a PKCS#11 HSM.
    #[serde(default)]
    pub keystore: KeystoreSettings,
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
    /// May release PIV PUKs (ReleasePivPuk) and confirm their rotation, with the master keys
    /// of `key_references`. DESIGN 3: only the gateway, for an active online session of the
    /// card or an audited helpdesk read-out.
    #[serde(default)]
    pub release_puk: bool,
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

/// `[keystore]`: where master keys live and where cryptograms are computed.
///
/// ```toml
/// [keystore]
/// backend = "pkcs11"
/// module = "/usr/lib/softhsm/libsofthsm2.so"
/// token_label = "cms"
/// pin_file = "/etc/cms/custody/hsm.pin"
/// ```
///
/// The user PIN is read from `pin_file` at start; it is never given in the config itself (nor
/// in the environment, where it would end up in process listings and crash reports).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoreSettings {
    #[serde(default)]
    pub backend: KeystoreBackend,
    /// The PKCS#11 module (shared library) of the HSM.
    #[serde(default)]
    pub module: Option<PathBuf>,
    /// The label of the token that holds the master keys.
    #[serde(default)]
    pub token_label: Option<String>,
    /// A file holding the token's user PIN (trailing whitespace ignored); keep it mode 0600.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Most PKCS#11 sessions kept open for reuse (more are opened under load and closed after).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeystoreBackend {
    /// Master keys wrapped under the key-encryption key in custody's own database.
    #[default]
    Soft,
    /// Master keys as non-extractable objects in a PKCS#11 HSM.
    Pkcs11,
}

impl Default for KeystoreSettings {
    fn default() -> Self {
        Self {
            backend: KeystoreBackend::Soft,
            module: None,
            token_label: None,
            pin_file: None,
            sessions: default_sessions(),
        }
    }
}

fn default_sessions() -> usize {
    8
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
    /// Lifetime of an online unblock session: a PUK version released to a session and not
    /// confirmed rotated within it counts as exposed.
    #[serde(default = "default_puk_session_secs")]
    pub puk_session_secs: u64,
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
            puk_session_secs: default_puk_session_secs(),
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
fn default_puk_session_secs() -> u64 {
    900
}
fn default_max_outstanding() -> usize {
    1_024
}

cms_kit::impl_service_config!(Config);
