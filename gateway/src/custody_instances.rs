//! Every custody instance behind the custody Service (`backends.custody.instances`). Each
//! Unseal share and each Seal goes to all of them, in parallel, each within the caller's
//! deadline: a standby keeps the seal for its turn, so custody is unsealed after a failover.
//! A share goes to custody instances only (over the same mutual TLS, to the configured
//! identity), and is never logged.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cms_kit::client::{self, Channel};
use cms_kit::tls::TlsSource;
use cms_proto::custody::v1::{InstanceSeal, ReplicaRole};
use futures_util::future::join_all;
use tonic::{Request, Response, Status};

use crate::admin::CustodyClient;
use crate::config::CustodyUpstream;
use crate::forward::Call;

/// How long one instance may take when the caller set no deadline.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

pub struct CustodyInstances {
    settings: CustodyUpstream,
    tls: Arc<TlsSource>,
    /// The Service's channel, reused when `address` is the only instance.
    service: Channel,
}

/// One instance's answer (or why there is none), by the address the gateway dialled.
pub struct Answer<R> {
    pub address: String,
    pub outcome: Result<R, Status>,
}

impl CustodyInstances {
    pub fn new(settings: CustodyUpstream, tls: Arc<TlsSource>, service: Channel) -> Self {
        Self {
            settings,
            tls,
            service,
        }
    }

    /// Every instance now, with a channel each: a host name that resolves to several
    /// addresses (a headless Service) stands for one instance per address.
    async fn resolve(&self) -> Vec<(String, Result<Channel, Status>)> {
        if self.settings.instances.is_empty() {
            return vec![(self.settings.address.clone(), Ok(self.service.clone()))];
        }
        // Every instance is checked for the name of the custody Service (`address`), which
        // every custody certificate carries, and for custody's SPIFFE ID.
        let service = self.settings.upstream(&self.settings.address);
        let mut out = Vec::new();
        for address in &self.settings.instances {
            let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(address.as_str()).await {
                Ok(found) => {
                    let mut found: Vec<SocketAddr> = found.collect();
                    found.sort();
                    found.dedup();
                    found
                }
                Err(e) => {
                    let refusal = Status::unavailable(format!("cannot resolve {address}: {e}"));
                    out.push((address.clone(), Err(refusal)));
                    continue;
                }
            };
            let several = resolved.len() > 1;
            for dial in resolved {
                let dial = dial.to_string();
                let channel = client::channel_via(&service, &dial, self.tls.clone());
                // A name for several pods is listed by their addresses.
                let label = if several { dial } else { address.clone() };
                out.push((label, channel.map_err(bad_address)));
            }
        }
        out
    }

    /// Sends `message` to every instance with `rpc`, in parallel, each within the call's
    /// deadline. The decision log gets one line for the whole call (by the caller).
    pub async fn each<B, R, F, Fut>(&self, call: &Call, message: B, rpc: F) -> Vec<Answer<R>>
    where
        B: Clone,
        F: Fn(CustodyClient, Request<B>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let deadline = call.deadline.unwrap_or(DEFAULT_DEADLINE);
        let calls = self.resolve().await.into_iter().map(|(address, channel)| {
            let sent = channel.map(|c| rpc(CustodyClient::new(c), call.outgoing(message.clone())));
            async move {
                let outcome = match sent {
                    Err(refusal) => Err(refusal),
                    Ok(sent) => match tokio::time::timeout(deadline, sent).await {
                        Ok(answer) => answer.map(Response::into_inner),
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "no answer within {} ms",
                            deadline.as_millis()
                        ))),
                    },
                };
                Answer { address, outcome }
            }
        });
        join_all(calls).await
    }
}

fn bad_address(e: client::ClientError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The answers as one: the active instance's answer (else the first that answered), and an
/// entry per instance. When no instance answered, the most telling refusal (a wrong share
/// rather than an unreachable standby).
pub fn combine<R>(
    answers: Vec<Answer<R>>,
    own: impl Fn(&R) -> Vec<InstanceSeal>,
) -> Result<(R, Vec<InstanceSeal>), Status> {
    let mut primary: Option<(bool, R)> = None;
    let mut refusal: Option<Status> = None;
    let mut instances = Vec::new();
    for Answer { address, outcome } in answers {
        match outcome {
            Ok(answer) => {
                let entry = own(&answer).into_iter().next().unwrap_or(InstanceSeal {
                    reached: true,
                    ..Default::default()
                });
                let active = entry.role == ReplicaRole::Active as i32;
                instances.push(InstanceSeal { address, ..entry });
                if primary
                    .as_ref()
                    .is_none_or(|(was_active, _)| active && !was_active)
                {
                    primary = Some((active, answer));
                }
            }
            Err(status) => {
                instances.push(InstanceSeal {
                    address,
                    reached: !unreached(&status),
                    error: format!("{:?}: {}", status.code(), status.message()),
                    ..Default::default()
                });
                if refusal
                    .as_ref()
                    .is_none_or(|r| unreached(r) && !unreached(&status))
                {
                    refusal = Some(status);
                }
            }
        }
    }
    match primary {
        Some((_, answer)) => Ok((answer, instances)),
        None => Err(refusal.unwrap_or_else(|| Status::unavailable("no custody instance"))),
    }
}

/// Whether `status` says the instance did not take the call at all.
fn unreached(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cms_proto::custody::v1::SealState;

    fn own(state: SealState, role: ReplicaRole) -> Vec<InstanceSeal> {
        vec![InstanceSeal {
            reached: true,
            role: role as i32,
            seal_state: state as i32,
            ..Default::default()
        }]
    }

    #[test]
    fn the_active_answer_leads_and_every_instance_is_listed() {
        let answers = vec![
            Answer {
                address: "a:1".into(),
                outcome: Ok(own(SealState::Sealed, ReplicaRole::Standby)),
            },
            Answer {
                address: "b:1".into(),
                outcome: Ok(own(SealState::Unsealed, ReplicaRole::Active)),
            },
            Answer {
                address: "c:1".into(),
                outcome: Err(Status::unavailable("connection refused")),
            },
        ];
        let (lead, instances) = combine(answers, |r| r.clone()).unwrap();
        assert_eq!(lead[0].role, ReplicaRole::Active as i32);
        let addresses: Vec<_> = instances.iter().map(|i| i.address.as_str()).collect();
        assert_eq!(addresses, ["a:1", "b:1", "c:1"]);
        assert!(!instances[2].reached);
        assert!(instances[2].error.contains("connection refused"));
    }

    #[test]
    fn a_refused_share_is_told_rather_than_an_unreachable_instance() {
        let answers: Vec<Answer<Vec<InstanceSeal>>> = vec![
            Answer {
                address: "a:1".into(),
                outcome: Err(Status::unavailable("down")),
            },
            Answer {
                address: "b:1".into(),
                outcome: Err(Status::failed_precondition("wrong shares")),
            },
        ];
        let refusal = combine(answers, |r| r.clone()).unwrap_err();
        assert_eq!(refusal.code(), tonic::Code::FailedPrecondition);
    }
}
