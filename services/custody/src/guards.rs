//! Guards that hold even if the gateway is compromised: caller scopes, a per-caller token
//! bucket, and a bound on requests in progress (load is shed, not queued). The per-card limit
//! and replay refusal live in the audit writer, where they are decided durably.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::Quota;

use cms_kit::{PeerIdentity, SpiffeId};
use cms_proto::common::v1::{ActorKind, AuthContext};

use crate::config::{CallerScope, GuardSettings};
use crate::error::Error;

/// Token bucket per caller identity (governor's keyed GCRA limiter).
pub struct RateLimiter {
    buckets: governor::DefaultKeyedRateLimiter<String>,
}

impl RateLimiter {
    pub fn new(settings: &GuardSettings) -> Self {
        let burst = NonZeroU32::new(settings.caller_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            buckets: governor::RateLimiter::keyed(
                refill(settings.caller_rate_per_sec).allow_burst(burst),
            ),
        }
    }

    /// Takes one token for `caller`, or refuses.
    pub fn take(&self, caller: &str) -> Result<(), Error> {
        // Keyed by an owned String: the limiter's map wants owned keys, and a caller is one
        // of the few identities on the allow-list.
        self.buckets
            .check_key(&caller.to_owned())
            .map_err(|_| Error::CallerRate)
    }
}

/// One token every 1/rate seconds. A rate of 0 (or less) means a caller gets its burst and
/// never more, as before: a refill period no run of the service will see.
fn refill(rate_per_sec: f64) -> Quota {
    const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let period = if rate_per_sec > 0.0 && rate_per_sec.is_finite() {
        Duration::from_secs_f64(1.0 / rate_per_sec).min(NEVER)
    } else {
        NEVER
    };
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
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

    #[test]
    fn a_rate_of_zero_gives_the_burst_and_never_refills() {
        let limiter = RateLimiter::new(&GuardSettings {
            caller_rate_per_sec: 0.0,
            caller_burst: 2,
            ..GuardSettings::default()
        });
        limiter.take("a").unwrap();
        limiter.take("a").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(matches!(limiter.take("a"), Err(Error::CallerRate)));
    }
}
