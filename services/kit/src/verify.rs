//! The rules every certificate must meet, ours and our peers', on top of what webpki checks.
//!
//! webpki verifies the chain, the validity period and, when a leaf lists extended key usages,
//! that the wanted one is among them. It does not see the trust anchor's path-length
//! constraint (an anchor keeps only its subject and key), accepts a leaf with no extended key
//! usage at all and ignores key usage. A private PKI that issues workload identities needs all
//! three, so [`PeerRules::check`] adds them, and the SPIFFE ID limits, to both directions:
//! [`PeerRules::client_verifier`] for the certificates clients present to our ports and
//! [`PeerRules::server_verifier`] for the certificates of the servers we call. The TLS source
//! runs the same check on its own certificate before a reload replaces the one in use.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{IdentityError, SpiffeId};

/// Which end of a TLS connection a certificate authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A client of one of our ports: needs the clientAuth extended key usage.
    Client,
    /// A server we call: needs the serverAuth extended key usage.
    Server,
}

impl Purpose {
    fn eku_name(self) -> &'static str {
        match self {
            Purpose::Client => "clientAuth",
            Purpose::Server => "serverAuth",
        }
    }

    fn webpki_usage(self) -> webpki::KeyUsage {
        match self {
            Purpose::Client => webpki::KeyUsage::client_auth(),
            Purpose::Server => webpki::KeyUsage::server_auth(),
        }
    }
}

/// Why a certificate does not meet the rules. Names the rule, never the certificate's bytes.
#[derive(Clone, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("certificate cannot be parsed")]
    Unparsable,
    #[error("certificate expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotValidYet,
    #[error("certificate is not issued by a CA of the trust bundle")]
    UnknownIssuer,
    #[error("a CA's path-length constraint is exceeded (too many intermediate CAs below it)")]
    PathLength,
    #[error("certificate chain does not verify: {0}")]
    Chain(String),
    #[error("certificate has no {0} extended key usage")]
    MissingEku(&'static str),
    #[error("certificate's key usage does not allow digitalSignature")]
    KeyUsage,
    #[error("certificate's SPIFFE ID: {0}")]
    Identity(#[from] IdentityError),
}

/// The message itself: rustls shows a custom certificate error with `{:?}`
/// ("invalid peer certificate: Other(OtherError(…))"), and that text reaches logs and callers.
impl fmt::Debug for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<webpki::Error> for RuleError {
    fn from(e: webpki::Error) -> Self {
        use webpki::Error as E;
        match e {
            E::CertExpired { .. } => RuleError::Expired,
            E::CertNotValidYet { .. } => RuleError::NotValidYet,
            E::UnknownIssuer => RuleError::UnknownIssuer,
            E::PathLenConstraintViolated => RuleError::PathLength,
            E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
                RuleError::Chain("a certificate of the chain does not allow this use".into())
            }
            E::BadDer | E::BadDerTime => RuleError::Unparsable,
            other => RuleError::Chain(format!("{other:?}")),
        }
    }
}

/// What a trust anchor allows below it: `None` is no path-length constraint.
#[derive(Clone)]
struct AnchorLimit {
    subject: Vec<u8>,
    spki: Vec<u8>,
    max_intermediates: Option<usize>,
}

/// The trust bundle and the rules, shared by both verifiers and the reload check.
#[derive(Clone)]
pub struct PeerRules {
    roots: Arc<RootCertStore>,
    limits: Arc<[AnchorLimit]>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PeerRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerRules")
            .field("anchors", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl PeerRules {
    /// Trusts the CA certificates of `bundle` (PEM order), each with its own path-length
    /// constraint.
    pub fn new(
        bundle: &[CertificateDer<'static>],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        let mut limits = Vec::with_capacity(bundle.len());
        for (index, der) in bundle.iter().enumerate() {
            let which = || format!("certificate {} of the bundle", index + 1);
            let anchor =
                webpki::anchor_from_trusted_cert(der).map_err(|e| format!("{}: {e:?}", which()))?;
            limits.push(AnchorLimit {
                subject: anchor.subject.as_ref().to_vec(),
                spki: anchor.subject_public_key_info.as_ref().to_vec(),
                max_intermediates: path_len_constraint(der)
                    .map_err(|e| format!("{}: {e}", which()))?,
            });
            roots
                .add(der.clone())
                .map_err(|e| format!("{}: {e}", which()))?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            limits: limits.into(),
            provider,
        })
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// Checks a chain (leaf first, as sent in a handshake) at `now` for `purpose` and returns
    /// the leaf's SPIFFE ID.
    pub fn check(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        purpose: Purpose,
    ) -> Result<SpiffeId, RuleError> {
        self.check_without_identity(leaf, intermediates, now, purpose)?;
        Ok(SpiffeId::from_certificate(leaf)?)
    }

    /// [`Self::check`] for certificates that need not carry a SPIFFE ID: those a port accepts
    /// only because a directory binds them to an account.
    pub fn check_without_identity(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        purpose: Purpose,
    ) -> Result<(), RuleError> {
        let end_entity = webpki::EndEntityCert::try_from(leaf)?;
        // Runs for every candidate path webpki builds; a path that breaks an anchor's
        // constraint is refused and the next candidate, if any, tried.
        let within_anchor_limit = |path: &webpki::VerifiedPath<'_>| {
            let anchor = path.anchor();
            let below = path.intermediate_certificates().count();
            let limit = self.limits.iter().find(|l| {
                l.subject == anchor.subject.as_ref()
                    && l.spki == anchor.subject_public_key_info.as_ref()
            });
            match limit.and_then(|l| l.max_intermediates) {
                Some(max) if below > max => Err(webpki::Error::PathLenConstraintViolated),
                _ => Ok(()),
            }
        };
        end_entity.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            purpose.webpki_usage(),
            None,
            Some(&within_anchor_limit),
        )?;
        check_leaf(leaf, purpose)
    }

    /// Verifies the certificates clients present: webpki's checks, then [`Self::check`].
    pub fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, String> {
        self.client_verifier_with_bound(None)
    }

    /// [`Self::client_verifier`] that also accepts the certificates of `bound`'s CAs without
    /// a SPIFFE ID (the same rules otherwise), for a port whose callers may be identified by
    /// a certificate bound to their account.
    pub fn client_verifier_with_bound(
        &self,
        bound: Option<&PeerRules>,
    ) -> Result<Arc<dyn ClientCertVerifier>, String> {
        let webpki = |rules: &PeerRules| {
            WebPkiClientVerifier::builder_with_provider(rules.roots.clone(), rules.provider.clone())
                .build()
                .map_err(|e| format!("client verifier: {e}"))
        };
        let inner = webpki(self)?;
        let bound = match bound {
            Some(rules) => Some((webpki(rules)?, rules.clone())),
            None => None,
        };
        // Browsers choose the certificate to present from these names: both bundles.
        let mut hints = inner.root_hint_subjects().to_vec();
        if let Some((verifier, _)) = &bound {
            hints.extend(verifier.root_hint_subjects().iter().cloned());
        }
        Ok(Arc::new(RuledClientVerifier {
            inner,
            rules: self.clone(),
            bound,
            hints,
        }))
    }

    /// Verifies the certificates of servers we call: webpki's checks (chain and server
    /// name), then [`Self::check`].
    pub fn server_verifier(&self) -> Result<Arc<dyn ServerCertVerifier>, String> {
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| format!("server verifier: {e}"))?;
        Ok(Arc::new(RuledServerVerifier {
            inner,
            rules: self.clone(),
        }))
    }
}

/// The pathLenConstraint of a CA certificate, if it has one.
fn path_len_constraint(der: &CertificateDer<'_>) -> Result<Option<usize>, RuleError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|_| RuleError::Unparsable)?;
    let constraints = cert
        .basic_constraints()
        .map_err(|_| RuleError::Unparsable)?;
    Ok(constraints
        .and_then(|c| c.value.path_len_constraint)
        .map(|n| n as usize))
}

/// What webpki leaves to us on the leaf: an extended key usage for `purpose` (present, not
/// merely "not contradicted"), a key usage that allows signing the handshake, and exactly one
/// well-formed SPIFFE ID (the last checked by the caller).
fn check_leaf(leaf: &CertificateDer<'_>, purpose: Purpose) -> Result<(), RuleError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|_| RuleError::Unparsable)?;
    let eku = cert
        .extended_key_usage()
        .map_err(|_| RuleError::Unparsable)?;
    let has_eku = eku.is_some_and(|e| match purpose {
        Purpose::Client => e.value.client_auth,
        Purpose::Server => e.value.server_auth,
    });
    if !has_eku {
        return Err(RuleError::MissingEku(purpose.eku_name()));
    }
    let key_usage = cert.key_usage().map_err(|_| RuleError::Unparsable)?;
    if !key_usage.is_some_and(|k| k.value.digital_signature()) {
        return Err(RuleError::KeyUsage);
    }
    Ok(())
}

fn refused(e: RuleError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

#[derive(Debug)]
struct RuledClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rules: PeerRules,
    /// The bundle of certificates bound to accounts, accepted without a SPIFFE ID.
    bound: Option<(Arc<dyn ClientCertVerifier>, PeerRules)>,
    hints: Vec<DistinguishedName>,
}

impl RuledClientVerifier {
    fn verify_bound(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Option<Result<ClientCertVerified, rustls::Error>> {
        let (inner, rules) = self.bound.as_ref()?;
        Some(
            inner
                .verify_client_cert(end_entity, intermediates, now)
                .and_then(|verified| {
                    rules
                        .check_without_identity(end_entity, intermediates, now, Purpose::Client)
                        .map_err(refused)?;
                    Ok(verified)
                }),
        )
    }
}

impl ClientCertVerifier for RuledClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // webpki first: its errors carry the standard TLS alerts (expired, unknown CA).
        let workload = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|verified| {
                self.rules
                    .check(end_entity, intermediates, now, Purpose::Client)
                    .map_err(refused)?;
                Ok(verified)
            });
        let unknown_issuer = |e: &rustls::Error| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            )
        };
        match workload {
            Ok(verified) => Ok(verified),
            // The workload bundle's refusal is reported unless the certificate is one of the
            // bound bundle's (the workload bundle does not know its issuer) that breaks a rule.
            Err(refusal) => match self.verify_bound(end_entity, intermediates, now) {
                Some(Ok(verified)) => Ok(verified),
                Some(Err(bound)) if unknown_issuer(&refusal) && !unknown_issuer(&bound) => {
                    Err(bound)
                }
                _ => Err(refusal),
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct RuledServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    rules: PeerRules,
}

impl ServerCertVerifier for RuledServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.rules
            .check(end_entity, intermediates, now, Purpose::Server)
            .map_err(refused)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Issued, LeafSpec};
    use rustls_pki_types::pem::PemObject;

    fn der_chain(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn rules_for(ca: &Ca) -> PeerRules {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        PeerRules::new(&der_chain(&ca.cert_pem), provider).unwrap()
    }

    fn check(rules: &PeerRules, issued: &Issued, purpose: Purpose) -> Result<SpiffeId, RuleError> {
        let chain = der_chain(&issued.cert_pem);
        rules.check(&chain[0], &chain[1..], UnixTime::now(), purpose)
    }

    fn spec() -> LeafSpec {
        LeafSpec::new("spiffe://cms.test/cms/custody".parse().unwrap(), 1)
    }

    #[test]
    fn a_dev_leaf_passes_both_ways_even_with_its_root_in_the_chain() {
        let ca = Ca::generate("root").unwrap();
        let rules = rules_for(&ca);
        let mut issued = ca.issue(&spec()).unwrap();
        assert_eq!(
            check(&rules, &issued, Purpose::Client),
            Ok(spec().spiffe_id)
        );
        issued.cert_pem.push_str(&ca.cert_pem);
        assert_eq!(
            check(&rules, &issued, Purpose::Server),
            Ok(spec().spiffe_id)
        );
    }

    #[test]
    fn the_anchors_path_length_is_enforced() {
        let root = Ca::generate("root").unwrap(); // pathlen:0
        let sub = root.intermediate("sub").unwrap();
        let issued = sub.issue(&spec()).unwrap();
        assert_eq!(
            check(&rules_for(&root), &issued, Purpose::Client),
            Err(RuleError::PathLength)
        );
        // Trusting the intermediate itself is explicit: its own (absent) limit applies.
        assert!(check(&rules_for(&sub), &issued, Purpose::Client).is_ok());
    }

    #[test]
    fn leaf_rules() {
        use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
        let ca = Ca::generate("root").unwrap();
        let rules = rules_for(&ca);
        let no_eku = ca.issue_with(&spec(), |p| p.extended_key_usages.clear());
        assert_eq!(
            check(&rules, &no_eku.unwrap(), Purpose::Client),
            Err(RuleError::MissingEku("clientAuth"))
        );
        let client_only = ca
            .issue_with(&spec(), |p| p.extended_key_usages = vec![Eku::ClientAuth])
            .unwrap();
        assert!(check(&rules, &client_only, Purpose::Client).is_ok());
        assert!(check(&rules, &client_only, Purpose::Server).is_err());
        let no_ku = ca.issue_with(&spec(), |p| p.key_usages.clear()).unwrap();
        assert_eq!(
            check(&rules, &no_ku, Purpose::Client),
            Err(RuleError::KeyUsage)
        );
        let encipher_only = ca
            .issue_with(&spec(), |p| p.key_usages = vec![Ku::KeyEncipherment])
            .unwrap();
        assert_eq!(
            check(&rules, &encipher_only, Purpose::Server),
            Err(RuleError::KeyUsage)
        );
    }

    #[test]
    fn a_leaf_without_spiffe_id_passes_only_the_check_without_identity() {
        let ca = Ca::generate("root").unwrap();
        let rules = rules_for(&ca);
        let bare = ca
            .issue_with(&spec(), |p| p.subject_alt_names.clear())
            .unwrap();
        assert_eq!(
            check(&rules, &bare, Purpose::Client),
            Err(RuleError::Identity(IdentityError::Missing))
        );
        let chain = der_chain(&bare.cert_pem);
        let loose = |purpose| {
            rules.check_without_identity(&chain[0], &chain[1..], UnixTime::now(), purpose)
        };
        assert_eq!(loose(Purpose::Client), Ok(()));
        let no_eku = ca
            .issue_with(&spec(), |p| {
                p.subject_alt_names.clear();
                p.extended_key_usages.clear();
            })
            .unwrap();
        let chain = der_chain(&no_eku.cert_pem);
        assert_eq!(
            rules.check_without_identity(&chain[0], &chain[1..], UnixTime::now(), Purpose::Client),
            Err(RuleError::MissingEku("clientAuth"))
        );
    }

    #[test]
    fn a_bound_bundle_admits_its_certificates_without_spiffe_id_under_the_same_rules() {
        let workloads = Ca::generate("workloads").unwrap();
        let enterprise = Ca::generate("enterprise").unwrap();
        let verifier = rules_for(&workloads)
            .client_verifier_with_bound(Some(&rules_for(&enterprise)))
            .unwrap();
        let verify = |issued: &Issued| {
            let chain = der_chain(&issued.cert_pem);
            verifier
                .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let bare = |p: &mut rcgen::CertificateParams| p.subject_alt_names.clear();
        assert_eq!(verify(&workloads.issue(&spec()).unwrap()), Ok(()));
        assert_eq!(
            verify(&enterprise.issue_with(&spec(), bare).unwrap()),
            Ok(())
        );
        // A workload certificate still needs its SPIFFE ID.
        let err = verify(&workloads.issue_with(&spec(), bare).unwrap()).unwrap_err();
        assert!(err.contains("SPIFFE"), "{err}");
        // The bound bundle's certificates meet the same rules, and say which they break.
        let no_eku = enterprise
            .issue_with(&spec(), |p| {
                p.subject_alt_names.clear();
                p.extended_key_usages.clear();
            })
            .unwrap();
        let err = verify(&no_eku).unwrap_err();
        assert!(err.contains("clientAuth"), "{err}");
        // Without the bound bundle, the enterprise's certificates are unknown.
        let plain = rules_for(&workloads).client_verifier().unwrap();
        let chain = der_chain(&enterprise.issue_with(&spec(), bare).unwrap().cert_pem);
        assert!(
            plain
                .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
                .is_err()
        );
        // Browsers are offered both bundles' names.
        assert_eq!(verifier.root_hint_subjects().len(), 2);
    }

    #[test]
    fn time_and_issuer() {
        let ca = Ca::generate("root").unwrap();
        let rules = rules_for(&ca);
        let now = time::OffsetDateTime::now_utc();
        let mut expired = spec();
        expired.not_before = now - time::Duration::days(3);
        expired.not_after = now - time::Duration::days(1);
        assert_eq!(
            check(&rules, &ca.issue(&expired).unwrap(), Purpose::Client),
            Err(RuleError::Expired)
        );
        let mut future = spec();
        future.not_before = now + time::Duration::days(1);
        assert_eq!(
            check(&rules, &ca.issue(&future).unwrap(), Purpose::Client),
            Err(RuleError::NotValidYet)
        );
        let other = Ca::generate("other").unwrap();
        assert_eq!(
            check(&rules, &other.issue(&spec()).unwrap(), Purpose::Client),
            Err(RuleError::UnknownIssuer)
        );
    }
}
