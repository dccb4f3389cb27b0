use std::collections::BTreeMap;
use std::path::PathBuf;

use cms_kit::authz::AccessSettings;
use cms_kit::client::UpstreamSettings;
use cms_kit::db::DatabaseSettings;
use cms_kit::server::ServerSettings;
use cms_kit::telemetry::TelemetrySettings;
use cms_kit::tls::TlsSettings;
use serde::Deserialize;

/// Configuration of the directory service (TOML file + `CMS_DIRECTORY__…` environment).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the SQLite file (when `database.url` is unset) and of a generated
    /// secrets key (when `secrets.key_file` is unset).
    pub data_dir: PathBuf,
    pub server: ServerSettings,
    pub tls: TlsSettings,
    #[serde(default)]
    pub access: AccessSettings,
    #[serde(default)]
    pub database: DatabaseSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    #[serde(default)]
    pub secrets: SecretsSettings,
    #[serde(default)]
    pub self_service: SelfServiceSettings,
    /// The template service, to refuse credentials and operator scopes that name an unknown
    /// (or, for new cards, retired) template. Unset: template ids are only checked for form.
    #[serde(default)]
    pub template: Option<UpstreamSettings>,
    #[serde(default)]
    pub import: ImportSettings,
    /// LDAP sources for SyncLdap, by name; `default` is used when a request names none.
    #[serde(default)]
    pub ldap: BTreeMap<String, LdapSource>,
}

/// Where the key that encrypts TOTP secrets at rest comes from.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSettings {
    /// A file holding 32 random bytes as 64 hex digits (AES-256-GCM key). Unset:
    /// `<data_dir>/secrets.key`, generated with mode 0600 on first start.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Self-service enrolment and verification.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfServiceSettings {
    /// Failed verifications (answers or TOTP) before the user's self-service is locked.
    #[serde(default = "default_max_failed")]
    pub max_failed_attempts: u32,
    /// Length of that lockout.
    #[serde(default = "default_lockout")]
    pub lockout_seconds: u64,
    /// argon2id memory cost of security-answer hashes, KiB (OWASP: 19456).
    #[serde(default = "default_argon2_memory")]
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    #[serde(default = "default_argon2_iterations")]
    pub argon2_iterations: u32,
    /// A pending TOTP enrolment must be confirmed within this time.
    #[serde(default = "default_totp_confirm")]
    pub totp_confirm_seconds: u64,
}

fn default_max_failed() -> u32 {
    5
}
fn default_lockout() -> u64 {
    900
}
fn default_argon2_memory() -> u32 {
    19_456
}
fn default_argon2_iterations() -> u32 {
    2
}
fn default_totp_confirm() -> u64 {
    600
}

impl Default for SelfServiceSettings {
    fn default() -> Self {
        Self {
            max_failed_attempts: default_max_failed(),
            lockout_seconds: default_lockout(),
            argon2_memory_kib: default_argon2_memory(),
            argon2_iterations: default_argon2_iterations(),
            totp_confirm_seconds: default_totp_confirm(),
        }
    }
}

/// Limits of CSV imports.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSettings {
    /// Largest CSV accepted, in bytes.
    #[serde(default = "default_import_max")]
    pub max_bytes: u64,
}

fn default_import_max() -> u64 {
    512 * 1024 * 1024
}

impl Default for ImportSettings {
    fn default() -> Self {
        Self {
            max_bytes: default_import_max(),
        }
    }
}

/// One LDAP directory to synchronise users from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapSource {
    /// `ldap://host:port` (plain, for a local or tunnelled directory) or `ldapi://<socket>`.
    pub url: String,
    /// DN to bind as; unset: anonymous.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// File holding the bind password (one line).
    #[serde(default)]
    pub bind_password_file: Option<PathBuf>,
    /// Search base, e.g. `ou=people,dc=example,dc=org`.
    pub base_dn: String,
    #[serde(default = "default_ldap_filter")]
    pub filter: String,
    #[serde(default = "default_ldap_timeout")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub attributes: LdapAttributes,
    /// Refuse the whole sync when one entry is bad; otherwise bad entries are reported and
    /// skipped, and the others applied.
    #[serde(default)]
    pub strict: bool,
}

fn default_ldap_filter() -> String {
    "(objectClass=inetOrgPerson)".into()
}
fn default_ldap_timeout() -> u64 {
    10_000
}

/// Which LDAP attribute fills which user field.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapAttributes {
    #[serde(default = "a_uid")]
    pub username: String,
    #[serde(default = "a_cn")]
    pub display_name: String,
    #[serde(default = "a_mail")]
    pub email: String,
    #[serde(default = "a_phone")]
    pub phone: String,
    #[serde(default = "a_ou")]
    pub org_unit: String,
    #[serde(default = "a_uuid")]
    pub external_id: String,
    /// An attribute that marks a user disabled; unset: LDAP disables nobody (but a user
    /// missing from LDAP is disabled with disable_missing).
    #[serde(default)]
    pub disabled: Option<DisabledMarker>,
}

/// When an LDAP entry's user is disabled: `attribute` has one of `values` (case-insensitive,
/// e.g. employeeType = "terminated"), or, with `bit_mask`, is a number with one of those bits
/// set (Active Directory: userAccountControl, bit_mask = 2).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisabledMarker {
    pub attribute: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub bit_mask: u64,
}

fn a_uid() -> String {
    "uid".into()
}
fn a_cn() -> String {
    "cn".into()
}
fn a_mail() -> String {
    "mail".into()
}
fn a_phone() -> String {
    "telephoneNumber".into()
}
fn a_ou() -> String {
    "ou".into()
}
fn a_uuid() -> String {
    "entryUUID".into()
}

impl Default for LdapAttributes {
    fn default() -> Self {
        Self {
            username: a_uid(),
            display_name: a_cn(),
            email: a_mail(),
            phone: a_phone(),
            org_unit: a_ou(),
            external_id: a_uuid(),
            disabled: None,
        }
    }
}

cms_kit::impl_service_config!(Config);
