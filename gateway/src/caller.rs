//! Who is calling the gateway, from the verified SPIFFE ID of the connection.
//!
//! Paths under the trust domain: `/cms/operator/<name>` operators, `/cms/agent` and
//! `/cms/agent/<name>` card agents, `/cms/service/<name>` other services.

use cms_kit::PeerIdentity;

use crate::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Operator(String),
    /// The agent id: the SPIFFE path after `/cms/`, e.g. `agent/desktop-1`.
    Agent(String),
    Service(String),
    Other,
}

pub fn classify(peer: &PeerIdentity) -> Caller {
    let path = peer.spiffe_id.path();
    if let Some(name) = path.strip_prefix("/cms/operator/") {
        Caller::Operator(name.to_owned())
    } else if path == "/cms/agent" || path.starts_with("/cms/agent/") {
        Caller::Agent(path.trim_start_matches("/cms/").to_owned())
    } else if let Some(name) = path.strip_prefix("/cms/service/") {
        Caller::Service(name.to_owned())
    } else {
        Caller::Other
    }
}

/// How logs and audit name a caller known by a bound certificate (no SPIFFE ID).
pub fn bound_certificate_label(certificate: &cms_kit::CertificateIds) -> String {
    format!(
        "certificate issuer={:?} serial={}",
        certificate.issuer_dn,
        data_encoding::HEXLOWER.encode(&certificate.serial_number)
    )
}

/// The caller's SPIFFE ID, or its bound certificate's label (empty when neither).
pub fn peer_label<T>(request: &tonic::Request<T>) -> String {
    if let Some(peer) = PeerIdentity::of(request) {
        return peer.spiffe_id.to_string();
    }
    cms_kit::ConnectionIdentity::of(request)
        .and_then(|c| c.bound_certificate())
        .map(bound_certificate_label)
        .unwrap_or_default()
}

fn peer<T>(request: &tonic::Request<T>) -> Result<&PeerIdentity, Error> {
    PeerIdentity::of(request).ok_or_else(|| Error::Forbidden("no verified client identity".into()))
}

pub fn require_operator<T>(request: &tonic::Request<T>) -> Result<String, Error> {
    let peer = peer(request)?;
    match classify(peer) {
        Caller::Operator(name) => Ok(name),
        _ => Err(Error::Forbidden(format!(
            "{} is not an operator identity",
            peer.spiffe_id
        ))),
    }
}

pub fn require_agent<T>(request: &tonic::Request<T>) -> Result<(String, PeerIdentity), Error> {
    let peer = peer(request)?;
    match classify(peer) {
        Caller::Agent(id) => Ok((id, peer.clone())),
        _ => Err(Error::Forbidden(format!(
            "{} is not an agent identity",
            peer.spiffe_id
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(id: &str) -> Caller {
        classify(&PeerIdentity {
            spiffe_id: id.parse().unwrap(),
            remote_addr: None,
        })
    }

    #[test]
    fn classifies_paths() {
        assert_eq!(
            of("spiffe://t/cms/operator/alice"),
            Caller::Operator("alice".into())
        );
        assert_eq!(of("spiffe://t/cms/agent"), Caller::Agent("agent".into()));
        assert_eq!(
            of("spiffe://t/cms/agent/desk-1"),
            Caller::Agent("agent/desk-1".into())
        );
        assert_eq!(of("spiffe://t/cms/agentx"), Caller::Other);
        assert_eq!(
            of("spiffe://t/cms/service/billing"),
            Caller::Service("billing".into())
        );
        assert_eq!(of("spiffe://t/cms/gateway"), Caller::Other);
    }
}
