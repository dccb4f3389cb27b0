//! TLS material for mutual TLS, loaded from PEM files and reloaded when the files change.
//!
//! One [`TlsSource`] per process serves both directions: the acceptor takes
//! [`TlsSource::server_config`] for every new handshake and clients take
//! [`TlsSource::client_config`] for every new connection, so a certificate replaced on disk
//! (cert-manager, SPIRE, `cms pki init`) is used without a restart.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde::Deserialize;

use crate::identity::{IdentityError, SpiffeId};
use crate::shutdown::Shutdown;
use crate::verify::{PeerRules, Purpose, RuleError};

/// Installs ring as the process-wide rustls provider. Call once from `main`; the only provider
/// in the dependency graph, so a second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The `[tls]` section of every service config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM bundle of the CA certificates that sign peers (clients and servers).
    pub ca: PathBuf,
    /// PEM certificate chain of this workload, leaf first, carrying its spiffe:// URI SAN.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) of this workload.
    pub key: PathBuf,
    /// How often the files are checked for changes, in milliseconds (at least 1).
    #[serde(
        default = "default_reload_ms",
        deserialize_with = "crate::config::at_least_one"
    )]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    5_000
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{key}: {path} is not valid PEM: {source}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        source: pem::Error,
    },
    #[error("{key}: {path} holds no {what}")]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("tls.cert: {path}: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
    #[error("tls.cert: {path}: {source}")]
    Rule { path: PathBuf, source: RuleError },
    #[error("tls.cert: {path}: its SPIFFE ID is {found}, this service is {expected}")]
    OtherIdentity {
        path: PathBuf,
        found: SpiffeId,
        expected: SpiffeId,
    },
    #[error("tls.key: {key} does not match the certificate in {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("tls: {0}")]
    Rustls(String),
}

/// What was built from one reading of the files.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    rules: PeerRules,
    /// The CAs of certificates bound to accounts, when this port accepts them.
    bound_rules: Option<PeerRules>,
    chain: Vec<CertificateDer<'static>>,
    identity: SpiffeId,
    stamp: Stamp,
}

/// Modification time and length of the files (ca, cert, key, the bound bundle if any): a
/// change in any triggers a reload.
type Stamp = Vec<(Option<SystemTime>, u64)>;

/// A bundle of CAs whose client certificates a port accepts without a SPIFFE ID, because a
/// directory binds them to accounts; `key` names the config setting in errors.
#[derive(Clone, Debug)]
pub struct BoundBundle {
    pub key: &'static str,
    pub path: PathBuf,
}

pub struct TlsSource {
    settings: TlsSettings,
    bound: Option<BoundBundle>,
    current: RwLock<Arc<Loaded>>,
    /// The files last refused, so a bad replacement is reported once, not at every check.
    refused: Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource")
            .field("cert", &self.settings.cert)
            .finish_non_exhaustive()
    }
}

impl TlsSource {
    /// Reads and checks the files now; errors name the config key and the file.
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        Self::load_with_bound_bundle(settings, None)
    }

    /// [`Self::load`] for a port that also accepts client certificates of `bound`'s CAs
    /// without a SPIFFE ID (same rules otherwise); the acceptor marks such connections
    /// (`ConnectionIdentity::spiffe_id` is `None`) and the service decides who they are.
    pub fn load_with_bound_bundle(
        settings: TlsSettings,
        bound: Option<BoundBundle>,
    ) -> Result<Arc<Self>, TlsError> {
        let loaded = load(&settings, bound.as_ref())?;
        Ok(Arc::new(Self {
            settings,
            bound,
            current: RwLock::new(Arc::new(loaded)),
            refused: Mutex::new(None),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// The CA roots currently trusted.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.current().rules.roots()
    }

    /// The trust bundle and certificate rules currently in force.
    pub fn rules(&self) -> PeerRules {
        self.current().rules.clone()
    }

    /// The rules of certificates bound to accounts, when this port accepts them.
    pub fn bound_rules(&self) -> Option<PeerRules> {
        self.current().bound_rules.clone()
    }

    /// This workload's own SPIFFE ID, from its certificate.
    pub fn identity(&self) -> SpiffeId {
        self.current().identity.clone()
    }

    /// Reloads when any file changed. New files replace the ones in use only when they parse,
    /// the key matches, the certificate is valid now, its chain verifies to the (new) trust
    /// bundle under the peer rules, and it names this service; otherwise the old ones stay in
    /// use. Refused files are tried again at every call (a certificate may become valid, a
    /// half-written pair complete) but their error is returned once.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let old = self.current();
        let now = stamp(&self.settings, self.bound.as_ref());
        if now == old.stamp {
            return Ok(false);
        }
        let outcome = load(&self.settings, self.bound.as_ref()).and_then(|new| {
            check_replacement(&self.settings, &new, &old.identity)?;
            Ok(new)
        });
        let mut refused = self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match outcome {
            Ok(new) => {
                *refused = None;
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(new);
                Ok(true)
            }
            Err(_) if refused.as_ref() == Some(&now) => Ok(false),
            Err(e) => {
                *refused = Some(now);
                Err(e)
            }
        }
    }

    /// Checks the files every `reload_interval_ms` until shutdown.
    pub fn spawn_reloader(self: &Arc<Self>, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        // Config refuses 0; a struct built in code may still carry it (tokio panics on 0).
        let every = Duration::from_millis(self.settings.reload_interval_ms.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.wait() => return,
                }
                match this.reload_if_changed() {
                    Ok(true) => {
                        tracing::info!(identity = %this.identity(), "TLS certificates reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, identity = %this.identity(), "new TLS certificate refused; still serving with the current one")
                    }
                }
            }
        })
    }
}

fn stamp(settings: &TlsSettings, bound: Option<&BoundBundle>) -> Stamp {
    let one = |p: &Path| match fs::metadata(p) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    };
    let mut stamp = vec![one(&settings.ca), one(&settings.cert), one(&settings.key)];
    stamp.extend(bound.map(|b| one(&b.path)));
    stamp
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn parse_certs(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn load(settings: &TlsSettings, bound: Option<&BoundBundle>) -> Result<Loaded, TlsError> {
    // Stamp first: a file replaced while we read is seen again at the next tick.
    let stamp = stamp(settings, bound);
    let ca_pem = read("tls.ca", &settings.ca)?;
    let cert_pem = read("tls.cert", &settings.cert)?;
    let key_pem = read("tls.key", &settings.key)?;

    let rules = PeerRules::new(&parse_certs("tls.ca", &settings.ca, &ca_pem)?, provider())
        .map_err(|e| TlsError::Rustls(format!("tls.ca: {}: {e}", settings.ca.display())))?;
    let bound_rules = match bound {
        Some(b) => {
            let pem = read(b.key, &b.path)?;
            Some(
                PeerRules::new(&parse_certs(b.key, &b.path, &pem)?, provider()).map_err(|e| {
                    TlsError::Rustls(format!("{}: {}: {e}", b.key, b.path.display()))
                })?,
            )
        }
        None => None,
    };
    let chain = parse_certs("tls.cert", &settings.cert, &cert_pem)?;
    let identity = SpiffeId::from_certificate(&chain[0]).map_err(|source| TlsError::Identity {
        path: settings.cert.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::Empty {
            key: "tls.key",
            path: settings.key.clone(),
            what: "PEM private key",
        },
        source => TlsError::Pem {
            key: "tls.key",
            path: settings.key.clone(),
            source,
        },
    })?;

    let key_matches = |e: TlsError| match e {
        TlsError::Rustls(_) if !key_matches_certificate(&chain, &key) => TlsError::KeyMismatch {
            key: settings.key.clone(),
            cert: settings.cert.clone(),
        },
        other => other,
    };
    let server = server_config(&rules, bound_rules.as_ref(), chain.clone(), key.clone_key())
        .map_err(key_matches)?;
    let client = client_config(&rules, chain.clone(), key)?;
    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        rules,
        bound_rules,
        chain,
        identity,
        stamp,
    })
}

/// Whether the private key's public half is the leaf's (false when unknown or unparsable).
fn key_matches_certificate(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> bool {
    let Ok(signing_key) = provider().key_provider.load_private_key(key.clone_key()) else {
        return false;
    };
    rustls::sign::CertifiedKey::new(chain.to_vec(), signing_key)
        .keys_match()
        .is_ok()
}

/// What a replacement must meet beyond loading (which already checked that the key matches):
/// the rules peers apply to it, in both directions, now; and this service's own identity.
fn check_replacement(
    settings: &TlsSettings,
    new: &Loaded,
    expected: &SpiffeId,
) -> Result<(), TlsError> {
    let (leaf, intermediates) = new.chain.split_first().ok_or_else(|| TlsError::Empty {
        key: "tls.cert",
        path: settings.cert.clone(),
        what: "PEM certificate",
    })?;
    let now = UnixTime::now();
    for purpose in [Purpose::Server, Purpose::Client] {
        new.rules
            .check(leaf, intermediates, now, purpose)
            .map_err(|source| TlsError::Rule {
                path: settings.cert.clone(),
                source,
            })?;
    }
    if new.identity != *expected {
        return Err(TlsError::OtherIdentity {
            path: settings.cert.clone(),
            found: new.identity.clone(),
            expected: expected.clone(),
        });
    }
    Ok(())
}

fn server_config(
    rules: &PeerRules,
    bound: Option<&PeerRules>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let verifier = rules
        .client_verifier_with_bound(bound)
        .map_err(TlsError::Rustls)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("tls.cert/tls.key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_config(
    rules: &PeerRules,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, TlsError> {
    let verifier = rules.server_verifier().map_err(TlsError::Rustls)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("tls.cert/tls.key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, DevPki, LeafSpec};

    fn bundle(path: &Path) -> Option<BoundBundle> {
        Some(BoundBundle {
            key: "operators.client_ca_file",
            path: path.to_owned(),
        })
    }

    #[test]
    fn a_bound_bundle_is_loaded_reloaded_and_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new(dir.path().join("pki"), "cms.test");
        pki.init().unwrap();
        let settings = pki.tls_settings("gateway");
        let enterprise = Ca::generate("enterprise").unwrap();
        let ca_file = dir.path().join("operators-ca.pem");

        // A missing file is an error naming the setting, not a port that trusts nothing.
        let err = TlsSource::load_with_bound_bundle(settings.clone(), bundle(&ca_file))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("operators.client_ca_file: "), "{err}");

        fs::write(&ca_file, &enterprise.cert_pem).unwrap();
        let source = TlsSource::load_with_bound_bundle(settings.clone(), bundle(&ca_file)).unwrap();
        let leaf = |ca: &Ca| {
            let spec = LeafSpec::new("spiffe://x.test/unused".parse().unwrap(), 1);
            let issued = ca
                .issue_with(&spec, |p| p.subject_alt_names.clear())
                .unwrap();
            parse_certs("test", Path::new("leaf"), issued.cert_pem.as_bytes()).unwrap()
        };
        let accepts = |source: &TlsSource, chain: &[CertificateDer<'static>]| {
            source.bound_rules().is_some_and(|rules| {
                rules
                    .check_without_identity(
                        &chain[0],
                        &chain[1..],
                        UnixTime::now(),
                        Purpose::Client,
                    )
                    .is_ok()
            })
        };
        assert!(accepts(&source, &leaf(&enterprise)));

        // A new bundle on disk replaces the old one at the next check.
        let successor = Ca::generate("enterprise 2").unwrap();
        fs::write(&ca_file, &successor.cert_pem).unwrap();
        assert!(source.reload_if_changed().unwrap());
        assert!(accepts(&source, &leaf(&successor)));
        assert!(!accepts(&source, &leaf(&enterprise)));

        // Without a bound bundle, nothing is trusted beyond the workload CA.
        assert!(TlsSource::load(settings).unwrap().bound_rules().is_none());
    }
}
