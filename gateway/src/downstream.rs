//! Calls from the workflow to the backends: each with a deadline (the caller's, capped by
//! `helpdesk.downstream_timeout_ms`), the request id and operator in metadata, and the
//! transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) turned into plain
//! messages that an operator can act on. Other refusals pass through unchanged: the backends'
//! messages are caller-safe already.

use std::future::Future;
use std::time::{Duration, Instant};

use cms_kit::error_details::Refusal;
use cms_proto::common::v1::ErrorReason;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::Error;
use crate::forward::{ON_BEHALF_OF, REQUEST_ID};

/// One request's budget and identity towards the backends.
#[derive(Clone, Debug)]
pub struct Budget {
    pub request_id: String,
    pub operator: String,
    deadline: Instant,
}

impl Budget {
    /// The budget of a request: its own deadline, at most `cap`.
    pub fn of<T>(request: &Request<T>, operator: &str, cap: Duration) -> Self {
        let timeout = crate::forward::deadline_of(request).map_or(cap, |d| d.min(cap));
        Self {
            request_id: crate::forward::request_id_of(request),
            operator: operator.to_owned(),
            deadline: Instant::now() + timeout,
        }
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// A backend request carrying the request id, the operator and the time left.
    pub fn request<B>(&self, message: B) -> Request<B> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        if let Ok(v) = MetadataValue::try_from(self.request_id.as_str()) {
            metadata.insert(REQUEST_ID, v);
        }
        if let Ok(v) = MetadataValue::try_from(self.operator.as_str()) {
            metadata.insert(ON_BEHALF_OF, v);
        }
        request.set_timeout(self.left());
        request
    }

    /// Runs a call to `service` within the time left.
    pub async fn call<R>(
        &self,
        service: &'static str,
        call: impl Future<Output = Result<Response<R>, Status>>,
    ) -> Result<R, Error> {
        match tokio::time::timeout(self.left(), call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(plain(service, status)),
            Err(_) => Err(too_slow(service)),
        }
    }
}

fn unavailable(service: &str) -> Error {
    Error::Unavailable(format!(
        "the {service} service is unavailable at the moment; try again in a minute, or tell an administrator if it persists"
    ))
}

fn too_slow(service: &str) -> Error {
    Error::Timeout(format!(
        "the {service} service did not answer in time; the request was not completed, try again"
    ))
}

/// A backend's failure as the operator should read it.
pub fn plain(service: &str, status: Status) -> Error {
    match status.code() {
        Code::Unavailable => unavailable(service),
        // A connection that broke under the call (the backend died or was restarted) is
        // reported by the client as UNKNOWN or CANCELLED with the transport error as its
        // source; a status sent by the backend itself never has a source.
        Code::Unknown | Code::Cancelled if std::error::Error::source(&status).is_some() => {
            unavailable(service)
        }
        Code::DeadlineExceeded => too_slow(service),
        Code::ResourceExhausted => {
            let retry = cms_kit::error_details::detail(&status)
                .map(|d| d.retry_after_seconds)
                .unwrap_or_default();
            let when = if retry > 0 {
                format!("try again in {retry} s")
            } else {
                "try again later".to_owned()
            };
            Error::Refused(Box::new(
                Refusal::new(
                    Code::ResourceExhausted,
                    ErrorReason::RateLimited,
                    format!(
                        "the {service} service is at its limit ({}); {when}",
                        status.message()
                    ),
                )
                .retry_after_seconds(retry),
            ))
        }
        _ => Error::Backend(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_broken_under_the_call_reads_as_unavailable() {
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        match plain("custody", broken) {
            Error::Unavailable(message) => assert!(message.contains("custody"), "{message}"),
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_sent_by_the_backend_passes_through() {
        match plain("custody", Status::unknown("the backend said so")) {
            Error::Backend(status) => assert_eq!(status.code(), Code::Unknown),
            other => panic!("expected the backend's status, got {other:?}"),
        }
    }
}
