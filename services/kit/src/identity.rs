//! Workload identities: SPIFFE-style URI SANs (`spiffe://<trust-domain>/<path>`).
//!
//! The TLS acceptor reads the identity from the verified client certificate once and puts a
//! [`PeerIdentity`] into every request's extensions; handlers never parse certificates.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;

/// The longest SPIFFE ID accepted, in bytes (the SPIFFE ID standard's limit for URI SANs).
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;

/// A validated SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("not a SPIFFE ID (must start with spiffe://): {0:?}")]
    Scheme(String),
    #[error("SPIFFE ID has an empty or invalid trust domain: {0:?}")]
    TrustDomain(String),
    #[error("SPIFFE ID has an empty, invalid or dot path segment: {0:?}")]
    Path(String),
    #[error("SPIFFE ID is {0} bytes long, more than the {MAX_SPIFFE_ID_BYTES} allowed")]
    TooLong(usize),
    #[error("certificate cannot be parsed")]
    Certificate,
    #[error("certificate has no spiffe:// URI SAN")]
    Missing,
    #[error("certificate has more than one spiffe:// URI SAN")]
    Ambiguous,
}

impl SpiffeId {
    /// Builds `spiffe://<trust_domain>/cms/<workload>`, the form every CMS component uses.
    pub fn for_workload(trust_domain: &str, workload: &str) -> Result<Self, IdentityError> {
        format!("spiffe://{trust_domain}/cms/{workload}").parse()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split('/').next().unwrap_or_default()
    }

    /// The path after the trust domain, e.g. `/cms/gateway`.
    pub fn path(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        &rest[self.trust_domain().len()..]
    }

    /// Reads the single `spiffe://` URI SAN of a DER certificate.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        use x509_parser::prelude::*;
        let (_, parsed) =
            X509Certificate::from_der(cert.as_ref()).map_err(|_| IdentityError::Certificate)?;
        let mut found: Option<SpiffeId> = None;
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    if found.is_some() {
                        return Err(IdentityError::Ambiguous);
                    }
                    found = Some(uri.parse()?);
                }
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Checked first: the other errors echo the text, which must stay short.
        if s.len() > MAX_SPIFFE_ID_BYTES {
            return Err(IdentityError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let domain_ok = !domain.is_empty()
            && domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !domain_ok {
            return Err(IdentityError::TrustDomain(s.to_owned()));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                let ok = !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
                if !ok {
                    return Err(IdentityError::Path(s.to_owned()));
                }
            }
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// The identifiers of a verified client certificate that a directory can bind an account to.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CertificateIds {
    /// The issuer's distinguished name as RFC 4514 writes it (last RDN first, `,` between).
    pub issuer_dn: String,
    /// The serial number's big-endian bytes as the certificate holds them.
    pub serial_number: Vec<u8>,
    /// SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
}

impl fmt::Debug for CertificateIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CertificateIds(issuer {:?}, serial {}, spki sha256 {})",
            self.issuer_dn,
            data_encoding::HEXLOWER.encode(&self.serial_number),
            data_encoding::HEXLOWER.encode(&self.spki_sha256)
        )
    }
}

impl CertificateIds {
    /// Reads the identifiers of a DER certificate.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        use x509_parser::prelude::*;
        let (_, parsed) =
            X509Certificate::from_der(cert.as_ref()).map_err(|_| IdentityError::Certificate)?;
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            parsed.tbs_certificate.subject_pki.raw,
        );
        let mut spki_sha256 = [0u8; 32];
        spki_sha256.copy_from_slice(digest.as_ref());
        Ok(Self {
            issuer_dn: rfc4514(parsed.issuer()),
            serial_number: parsed.raw_serial().to_vec(),
            spki_sha256,
        })
    }
}

/// A distinguished name as RFC 4514 writes it: RDNs in reverse order separated by `,`,
/// multi-valued RDNs joined by `+`, special characters escaped, non-string values as `#hex`.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            let attributes: Vec<String> = rdn
                .iter()
                .map(|attr| {
                    let oid = attr.attr_type();
                    // RFC 4514's short names (CN, O, C, ...), else the dotted OID.
                    let key = x509_parser::objects::oid2abbrev(oid, registry)
                        .ok()
                        .filter(|name| {
                            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric())
                        })
                        .map(str::to_owned)
                        .unwrap_or_else(|| oid.to_id_string());
                    let value = match attr.as_str() {
                        Ok(text) => escape_dn_value(text),
                        Err(_) => format!(
                            "#{}",
                            data_encoding::HEXLOWER.encode(attr.attr_value().as_bytes())
                        ),
                    };
                    format!("{key}={value}")
                })
                .collect();
            attributes.join("+")
        })
        .collect();
    rdns.reverse();
    rdns.join(",")
}

fn escape_dn_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if c == '\0' {
            out.push_str("\\00");
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What the acceptor verified about a connection; tonic puts it into every request's
/// extensions, and the server adds a [`PeerIdentity`] when the certificate has a SPIFFE ID.
/// `spiffe_id` is `None` only on a port that accepts certificates bound to accounts (see
/// `TlsSource::load_with_bound_bundle`), for a certificate of that bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionIdentity {
    pub spiffe_id: Option<SpiffeId>,
    /// `None` only when the leaf cannot be re-read (it was verified, so in practice never).
    pub certificate: Option<CertificateIds>,
    pub remote_addr: Option<SocketAddr>,
}

impl ConnectionIdentity {
    /// The verified connection of a request.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&ConnectionIdentity> {
        request.extensions().get::<ConnectionIdentity>()
    }

    /// The identity the allow-list and handlers see, when the certificate has a SPIFFE ID.
    pub fn peer(&self) -> Option<PeerIdentity> {
        self.spiffe_id.clone().map(|spiffe_id| PeerIdentity {
            spiffe_id,
            remote_addr: self.remote_addr,
        })
    }

    /// The certificate of a caller without a SPIFFE ID, admitted only because a port trusts
    /// its CA for certificates bound to accounts.
    pub fn bound_certificate(&self) -> Option<&CertificateIds> {
        match self.spiffe_id {
            None => self.certificate.as_ref(),
            Some(_) => None,
        }
    }
}

/// Who is on the other end of a mutual-TLS connection, as verified by the acceptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe_id: SpiffeId,
    pub remote_addr: Option<SocketAddr>,
}

impl PeerIdentity {
    /// The verified caller of a request, put there by the acceptor.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
        request.extensions().get::<PeerIdentity>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits() {
        let id: SpiffeId = "spiffe://cms.local/cms/gateway".parse().unwrap();
        assert_eq!(id.trust_domain(), "cms.local");
        assert_eq!(id.path(), "/cms/gateway");
        assert_eq!(SpiffeId::for_workload("cms.local", "gateway").unwrap(), id);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://cms.local/x",
            "spiffe://",
            "spiffe://CMS/x",
            "spiffe://cms.local/",
            "spiffe://cms.local//x",
            "spiffe://cms.local/../x",
            "spiffe://cms.local/a b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn certificate_ids_follow_rfc_4514() {
        use rustls_pki_types::pem::PemObject;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CountryName, "DE");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme, Inc.");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Ops CA");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x02]));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap();
        let ids = CertificateIds::from_certificate(&der).unwrap();
        assert_eq!(ids.issuer_dn, "CN=Ops CA,O=Acme\\, Inc.,C=DE");
        assert_eq!(ids.serial_number, vec![0x01, 0x02]);
        let spki = ring::digest::digest(
            &ring::digest::SHA256,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
        );
        assert_eq!(&ids.spki_sha256[..], spki.as_ref());
    }

    #[test]
    fn length_is_limited_to_2048_bytes() {
        let prefix = "spiffe://cms.local/";
        let fits = format!("{prefix}{}", "a".repeat(MAX_SPIFFE_ID_BYTES - prefix.len()));
        assert!(fits.parse::<SpiffeId>().is_ok());
        let long = format!("{fits}a");
        assert_eq!(
            long.parse::<SpiffeId>(),
            Err(IdentityError::TooLong(MAX_SPIFFE_ID_BYTES + 1))
        );
    }
}
