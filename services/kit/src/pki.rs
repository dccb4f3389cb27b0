//! The development PKI: a CA and one certificate per workload, each with its SPIFFE ID.
//!
//! `cms pki init` writes it under `<data>/pki`; production uses certificates from cert-manager
//! or SPIRE instead (see deploy/README.md for the SANs each one needs). Tests use [`Ca`] to
//! issue good, expired, foreign and unlisted certificates.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// The certificate library, for tests that need a certificate the dev PKI would never issue
/// (see [`Ca::issue_with`]).
pub use rcgen;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::identity::SpiffeId;
use crate::tls::TlsSettings;

/// The server workloads of the CMS, in start order.
pub const SERVICES: [&str; 5] = ["template", "directory", "custody", "gateway", "agent"];

/// Client-only identities the dev PKI also issues.
pub const OPERATOR_CLIENT: &str = "operator/admin";
pub const AGENT_CLIENT: &str = "agent/desktop-1";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("pki: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pki: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("pki: {0}")]
    Identity(#[from] crate::identity::IdentityError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate and its key, PEM encoded.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// What to put in a leaf certificate.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub spiffe_id: SpiffeId,
    /// DNS names besides `localhost`.
    pub dns: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// Valid from an hour ago for `days`.
    pub fn new(spiffe_id: SpiffeId, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            spiffe_id,
            dns: Vec::new(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// A certificate authority that can issue leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificates between this CA and the root, this CA's first (empty for a root):
    /// appended to every leaf it issues, as a server sends its chain.
    chain_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "CMS development PKI");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
            chain_pem: String::new(),
        })
    }

    /// A CA:TRUE certificate with no path-length constraint of its own, signed by this CA
    /// (tests: the dev root's pathlen:0 forbids it).
    pub fn intermediate(&self, common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`Ca::generate`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            chain_pem: String::new(),
        })
    }

    /// Issues a leaf usable as both TLS server and client: serverAuth and clientAuth extended
    /// key usages and the digitalSignature key usage, as the peer rules require
    /// ([`crate::verify`]).
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        self.issue_with(spec, |_| {})
    }

    /// Like [`Ca::issue`], with `edit` applied to the certificate's parameters last: tests
    /// use it for certificates that break a rule.
    pub fn issue_with(
        &self,
        spec: &LeafSpec,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut dns = vec!["localhost".to_owned()];
        dns.extend(spec.dns.iter().cloned());
        let mut params = CertificateParams::new(dns)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::URI(spec.spiffe_id.as_str().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            spec.spiffe_id.path().trim_start_matches('/'),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        edit(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The SPIFFE ID of the first certificate in a PEM file.
pub fn spiffe_id_of_pem(pem: &[u8]) -> Result<SpiffeId, String> {
    let cert = CertificateDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM certificate".to_owned(),
        e => e.to_string(),
    })?;
    SpiffeId::from_certificate(&cert).map_err(|e| e.to_string())
}

/// Where the dev PKI keeps its files.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub dir: PathBuf,
    pub trust_domain: String,
}

impl DevPki {
    pub fn new(dir: impl Into<PathBuf>, trust_domain: &str) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: trust_domain.to_owned(),
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn file_stem(workload: &str) -> String {
        workload.replace('/', "-")
    }

    /// The `[tls]` settings for a workload's files.
    pub fn tls_settings(&self, workload: &str) -> TlsSettings {
        let stem = Self::file_stem(workload);
        TlsSettings {
            ca: self.ca_path(),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            reload_interval_ms: 5_000,
        }
    }

    pub fn spiffe_id(&self, workload: &str) -> Result<SpiffeId, PkiError> {
        Ok(SpiffeId::for_workload(&self.trust_domain, workload)?)
    }

    /// Creates whatever is missing: the CA, a certificate per service, the operator and agent
    /// client certificates. Existing files are kept. Returns the files written.
    pub fn init(&self) -> Result<Vec<PathBuf>, PkiError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        restrict_dir(&self.dir)?;
        let mut written = Vec::new();
        let ca_key_path = self.dir.join("ca.key");
        let ca = if self.ca_path().exists() && ca_key_path.exists() {
            let cert = fs::read_to_string(self.ca_path()).map_err(io_err(&self.ca_path()))?;
            let key = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
            Ca::from_pem(&cert, &key)?
        } else {
            let ca = Ca::generate(&format!("CMS dev CA ({})", self.trust_domain))?;
            write_secret(&ca_key_path, &ca.key_pem)?;
            write_public(&self.ca_path(), &ca.cert_pem)?;
            written.extend([ca_key_path.clone(), self.ca_path()]);
            ca
        };
        let workloads = SERVICES
            .iter()
            .copied()
            .chain([OPERATOR_CLIENT, AGENT_CLIENT]);
        for workload in workloads {
            let tls = self.tls_settings(workload);
            if tls.cert.exists() && tls.key.exists() {
                continue;
            }
            let mut spec = LeafSpec::new(self.spiffe_id(workload)?, 825);
            if SERVICES.contains(&workload) {
                spec.dns = vec![workload.to_owned(), format!("cms-{workload}")];
            }
            let issued = ca.issue(&spec)?;
            write_secret(&tls.key, &issued.key_pem)?;
            write_public(&tls.cert, &issued.cert_pem)?;
            written.extend([tls.key, tls.cert]);
        }
        Ok(written)
    }
}

fn restrict_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Writes a file readable only by its owner, via a temporary file and rename.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_atomic(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_idempotent_and_ids_match() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new(dir.path().join("pki"), "cms.test");
        let first = pki.init().unwrap();
        assert_eq!(first.len(), 2 + 2 * 7);
        assert!(pki.init().unwrap().is_empty());
        for workload in SERVICES
            .iter()
            .copied()
            .chain([OPERATOR_CLIENT, AGENT_CLIENT])
        {
            let tls = pki.tls_settings(workload);
            let pem = fs::read(&tls.cert).unwrap();
            let certs = crate::tls::parse_certs("tls.cert", &tls.cert, &pem).unwrap();
            let id = SpiffeId::from_certificate(&certs[0]).unwrap();
            assert_eq!(id, pki.spiffe_id(workload).unwrap());
        }
    }

    #[test]
    fn issued_certificates_meet_the_peer_rules_both_ways() {
        use crate::verify::{PeerRules, Purpose};
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new(dir.path().join("pki"), "cms.test");
        pki.init().unwrap();
        let ca_pem = fs::read(pki.ca_path()).unwrap();
        let bundle = crate::tls::parse_certs("tls.ca", &pki.ca_path(), &ca_pem).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let rules = PeerRules::new(&bundle, provider).unwrap();
        let now = rustls_pki_types::UnixTime::now();
        for workload in SERVICES
            .iter()
            .copied()
            .chain([OPERATOR_CLIENT, AGENT_CLIENT])
        {
            let tls = pki.tls_settings(workload);
            let pem = fs::read(&tls.cert).unwrap();
            let chain = crate::tls::parse_certs("tls.cert", &tls.cert, &pem).unwrap();
            for purpose in [Purpose::Client, Purpose::Server] {
                let id = rules.check(&chain[0], &chain[1..], now, purpose);
                assert_eq!(id, Ok(pki.spiffe_id(workload).unwrap()), "{workload}");
            }
        }
    }
}
