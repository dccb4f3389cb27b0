//! Guards that hold even if the gateway is compromised: caller scopes, a per-caller token
//! bucket, and a bound on requests in progress (load is shed, not queued). The per-card limit
//! and replay refusal live in the audit writer, where they are decided durably.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use cms_kit::{PeerIdentity, SpiffeId};
use cms_proto::common::v1::{ActorKind, AuthContext};

use crate::config::{CallerScope, GuardSettings};
use crate::error::Error;

/// Token bucket per caller identity.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(settings: &GuardSettings) -> Self {
        Self {
            rate: settings.caller_rate_per_sec.max(0.0),
            burst: f64::from(settings.caller_burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `caller`, or refuses.
    pub fn take(&self, caller: &str) -> Result<(), Error> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets
            .entry(caller.to_owned())
            .or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Error::CallerRate)
        }
    }
}

/// A cryptogram or PUK request must say who acts and under which request id (common.proto:
/// an unspecified actor kind is rejected): custody's audit record is only as good as that.
pub fn require_context(auth: &AuthContext) -> Result<(), Error> {
    if ActorKind::try_from(auth.actor_kind).unwrap_or(ActorKind::Unspecified)
        == ActorKind::Unspecified
    {
        return Err(Error::Invalid {
            field: "auth.actor_kind",
            message: "the authorization context must say who acts (operator, user or service)"
                .into(),
        });
    }
    if auth.request_id.trim().is_empty() {
        return Err(Error::Invalid {
            field: "auth.request_id",
            message: "the authorization context must carry the request id".into(),
        });
    }
    Ok(())
}

/// The verified peer of a request, as the TLS acceptor put it there; none when unverified.
#[derive(Clone, Debug, Default)]
pub struct Peer(Option<SpiffeId>);

impl Peer {
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        Self(PeerIdentity::of(request).map(|p| p.spiffe_id.clone()))
    }

    /// Who asked, for the audit record, even when it has no scope here.
    pub fn audit_name(&self) -> String {
        self.0
            .as_ref()
            .map_or_else(|| "unidentified".into(), ToString::to_string)
    }
}

/// The verified caller and its scope.
pub struct Caller<'a> {
    pub identity: String,
    pub scope: &'a CallerScope,
}

pub fn caller<'a>(scopes: &'a [CallerScope], peer: &Peer) -> Result<Caller<'a>, Error> {
    let peer = peer
        .0
        .as_ref()
        .ok_or_else(|| Error::NotAllowed("no verified client identity".into()))?;
    let scope = scopes
        .iter()
        .find(|s| s.identity.matches(peer))
        .ok_or_else(|| Error::NotAllowed(format!("caller {peer} has no scope in custody")))?;
    Ok(Caller {
        identity: peer.to_string(),
        scope,
    })
}

impl Caller<'_> {
    pub fn require_admin(&self) -> Result<(), Error> {
        if self.scope.admin {
            Ok(())
        } else {
            Err(Error::NotAllowed(format!(
                "caller {} may not administer custody",
                self.identity
            )))
        }
    }

    pub fn require_release_puk(&self) -> Result<(), Error> {
        if self.scope.release_puk {
            Ok(())
        } else {
            Err(Error::NotAllowed(format!(
                "caller {} may not release PIV PUKs (its custody scope lacks release_puk)",
                self.identity
            )))
        }
    }

    pub fn require_key(&self, reference: &str) -> Result<(), Error> {
        if self.scope.may_use(reference) {
            Ok(())
        } else {
            Err(Error::NotAllowed(format!(
                "caller {} may not use master key {reference}",
                self.identity
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refuses_beyond_burst_and_refills() {
        let limiter = RateLimiter::new(&GuardSettings {
            caller_rate_per_sec: 1_000.0,
            caller_burst: 3,
            ..GuardSettings::default()
        });
        for _ in 0..3 {
            limiter.take("a").unwrap();
        }
        assert!(matches!(limiter.take("a"), Err(Error::CallerRate)));
        limiter.take("b").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        limiter.take("a").unwrap();
    }
}
