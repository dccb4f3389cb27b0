//! Per-service allow-lists of caller identities.
//!
//! Every request of a service's own API must come from a SPIFFE ID on its list; anything else
//! gets PERMISSION_DENIED (the connection and the service stay up). Health and reflection stay
//! open to any peer with a valid certificate of our CA, so probes and tooling work.
//! Refusals carry the standard error details ([`crate::error_details`]); the path a caller
//! sent is echoed and logged only up to [`SHOWN_PATH_BYTES`].

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response};
use serde::Deserialize;

use cms_proto::common::v1::ErrorReason;
use tonic::Code;

use crate::error_details::Refusal;
use crate::identity::{ConnectionIdentity, PeerIdentity, SpiffeId};

/// The `[access]` section of a service config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSettings {
    /// Callers allowed to use this service's API: exact SPIFFE IDs, or `spiffe://td/path/*`
    /// for every identity below a path (one agent identity per desktop, say).
    #[serde(default)]
    pub allow: Vec<IdentityPattern>,
}

/// An exact SPIFFE ID, or every ID below a path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IdentityPattern {
    Exact(SpiffeId),
    Below(SpiffeId),
}

impl IdentityPattern {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(exact) => exact == id,
            Self::Below(base) => id
                .as_str()
                .strip_prefix(base.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

impl std::str::FromStr for IdentityPattern {
    type Err = crate::identity::IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_suffix("/*") {
            Some(base) => Ok(Self::Below(base.parse()?)),
            None => Ok(Self::Exact(s.parse()?)),
        }
    }
}

impl<'de> Deserialize<'de> for IdentityPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// gRPC paths every authenticated peer may call.
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];

/// How much of a caller-sent path a refusal echoes or logs.
pub const SHOWN_PATH_BYTES: usize = 128;

/// At most [`SHOWN_PATH_BYTES`] of `path`, cut at a character boundary.
fn shown(path: &str) -> &str {
    let mut end = path.len().min(SHOWN_PATH_BYTES);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// Also puts the [`PeerIdentity`] of the connection (when its certificate has a SPIFFE ID)
/// into the request's extensions, for the handlers.
#[derive(Clone, Debug)]
pub struct AllowListLayer {
    allowed: Arc<[IdentityPattern]>,
    domain: Arc<str>,
    bound_paths: Arc<[&'static str]>,
}

impl AllowListLayer {
    /// `domain` is the error domain of refusals (`cms.custody`).
    pub fn new(domain: &str, allowed: impl IntoIterator<Item = IdentityPattern>) -> Self {
        Self {
            allowed: allowed.into_iter().collect(),
            domain: Arc::from(domain),
            bound_paths: Arc::new([]),
        }
    }

    /// Lets callers without a SPIFFE ID (certificates a port accepts because a directory
    /// binds them to accounts) reach `paths` (one ending in `/`, other than `/` itself,
    /// covers everything below it), and nothing else; the service then decides who they are.
    pub fn admitting_bound_certificates(mut self, paths: &[&'static str]) -> Self {
        self.bound_paths = paths.iter().copied().collect();
        self
    }
}

/// Whether a caller known only by a bound certificate may reach `path`.
pub fn admits_bound_certificate(bound_paths: &[&str], path: &str) -> Result<(), Refusal> {
    let admitted =
        |p: &&str| path == *p || (p.len() > 1 && p.ends_with('/') && path.starts_with(p));
    if bound_paths.iter().any(admitted) {
        return Ok(());
    }
    Err(Refusal::new(
        Code::PermissionDenied,
        ErrorReason::PermissionDenied,
        format!(
            "a caller identified by a bound certificate may not call {}",
            shown(
                path.trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or_default()
            )
        ),
    ))
}

impl<S> tower_layer::Layer<S> for AllowListLayer {
    type Service = AllowList<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AllowList {
            inner,
            allowed: self.allowed.clone(),
            domain: self.domain.clone(),
            bound_paths: self.bound_paths.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AllowList<S> {
    inner: S,
    allowed: Arc<[IdentityPattern]>,
    domain: Arc<str>,
    bound_paths: Arc<[&'static str]>,
}

/// Whether `peer` may call `path`. Pure, so it is unit-tested without a server.
pub fn decide(
    allowed: &[IdentityPattern],
    peer: Option<&PeerIdentity>,
    path: &str,
) -> Result<(), Refusal> {
    let Some(peer) = peer else {
        return Err(Refusal::new(
            Code::Unauthenticated,
            ErrorReason::PermissionDenied,
            "no verified client identity",
        ));
    };
    if OPEN_PREFIXES.iter().any(|p| path.starts_with(p))
        || allowed.iter().any(|p| p.matches(&peer.spiffe_id))
    {
        return Ok(());
    }
    Err(Refusal::new(
        Code::PermissionDenied,
        ErrorReason::PermissionDenied,
        format!(
            "caller {} is not allowed to call {}",
            peer.spiffe_id,
            shown(
                path.trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or_default()
            )
        ),
    ))
}

impl<S, B, RB> tower_service::Service<Request<B>> for AllowList<S>
where
    S: tower_service::Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<RB>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let connection = req.extensions().get::<ConnectionIdentity>().cloned();
        if req.extensions().get::<PeerIdentity>().is_none()
            && let Some(peer) = connection.as_ref().and_then(ConnectionIdentity::peer)
        {
            req.extensions_mut().insert(peer);
        }
        let peer = req.extensions().get::<PeerIdentity>();
        let bound = peer.is_none()
            && connection
                .as_ref()
                .and_then(ConnectionIdentity::bound_certificate)
                .is_some();
        let outcome = if bound {
            admits_bound_certificate(&self.bound_paths, req.uri().path())
        } else {
            decide(&self.allowed, peer, req.uri().path())
        };
        match outcome {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(refusal) => {
                tracing::warn!(
                    peer = peer.map(|p| p.spiffe_id.as_str()).unwrap_or("-"),
                    path = shown(req.uri().path()),
                    "request refused by allow-list"
                );
                Either::Left(ready(Ok(refusal.into_status(&self.domain).into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> PeerIdentity {
        PeerIdentity {
            spiffe_id: id.parse().unwrap(),
            remote_addr: None,
        }
    }

    #[test]
    fn bound_certificates_reach_only_the_admitted_paths() {
        let paths = ["/", "/code.js", "/cms.gateway.v1.HelpdeskService/"];
        for ok in ["/", "/code.js", "/cms.gateway.v1.HelpdeskService/WhoAmI"] {
            assert!(admits_bound_certificate(&paths, ok).is_ok(), "{ok}");
        }
        for refused in [
            "/x",
            "/code.jsx",
            "/cms.gateway.v1.AgentLinkService/Hello",
            "/cms.gateway.v1.HelpdeskServiceX/WhoAmI",
        ] {
            assert!(
                admits_bound_certificate(&paths, refused).is_err(),
                "{refused}"
            );
        }
        assert!(admits_bound_certificate(&[], "/").is_err());
    }

    #[test]
    fn allow_list_decisions() {
        let allowed: Vec<IdentityPattern> = vec![
            "spiffe://cms.local/cms/gateway".parse().unwrap(),
            "spiffe://cms.local/cms/agent/*".parse().unwrap(),
        ];
        let gw = peer("spiffe://cms.local/cms/gateway");
        let other = peer("spiffe://cms.local/cms/agentx");
        let desktop = peer("spiffe://cms.local/cms/agent/desktop-7");
        assert!(
            decide(
                &allowed,
                Some(&desktop),
                "/cms.gateway.v1.AgentLinkService/Connect"
            )
            .is_ok()
        );
        assert!(
            decide(
                &allowed,
                Some(&peer("spiffe://cms.local/cms/agent")),
                "/x.Y/Z"
            )
            .is_err()
        );
        assert!(
            decide(
                &allowed,
                Some(&gw),
                "/cms.custody.v1.CustodyService/GetStatus"
            )
            .is_ok()
        );
        let denied = decide(
            &allowed,
            Some(&other),
            "/cms.custody.v1.CustodyService/GetStatus",
        )
        .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(decide(&allowed, Some(&other), "/grpc.health.v1.Health/Check").is_ok());
        assert_eq!(
            decide(&allowed, None, "/grpc.health.v1.Health/Check")
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_refusal_echoes_only_the_start_of_a_long_path() {
        let allowed: Vec<IdentityPattern> = vec!["spiffe://cms.local/cms/gateway".parse().unwrap()];
        // The cut falls inside "é": the echo stops before it.
        let path = format!("/{}é/M", "s".repeat(SHOWN_PATH_BYTES - 1));
        let denied = decide(&allowed, Some(&peer("spiffe://cms.local/cms/x")), &path).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied
                .message()
                .ends_with(&format!(" {}", "s".repeat(SHOWN_PATH_BYTES - 1))),
            "{}",
            denied.message()
        );
        let status = denied.into_status("cms.test");
        assert_eq!(
            crate::error_details::detail(&status).unwrap().reason,
            ErrorReason::PermissionDenied as i32
        );
    }
}
