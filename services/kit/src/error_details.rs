//! The one way every service turns a refusal into a `tonic::Status`: gRPC's richer error
//! model, so that stock gRPC clients can read it.
//!
//! `grpc-status-details-bin` carries a `google.rpc.Status` with
//! - `google.rpc.ErrorInfo`: our reason code (`CODE_CHECKSUM_MISMATCH`, the
//!   `cms.common.v1.ErrorReason` name without its prefix) in the service's domain
//!   (`cms.custody`), and the offending field in its metadata;
//! - `google.rpc.BadRequest` with the field (INVALID_ARGUMENT only);
//! - `google.rpc.RetryInfo` when a retry may succeed later;
//! - our own `cms.common.v1.ErrorDetail` (reason, field, retry and attempts as numbers), for
//!   CMS clients; read it back with [`detail`].
//!
//! Messages are the caller-safe text of the error; internal details never go here.

use std::collections::HashMap;
use std::time::Duration;

use cms_proto::common::v1::{ErrorDetail, ErrorReason};
use prost::Message;
use prost_types::Any;
use tonic::Code;
use tonic_types::{BadRequest, ErrorInfo, FieldViolation, RetryInfo, pb};

/// Type URL of the [`ErrorDetail`] inside the `google.rpc.Status`.
pub const ERROR_DETAIL_TYPE_URL: &str = "type.googleapis.com/cms.common.v1.ErrorDetail";

/// A refusal on its way to the caller. Build it, then [`Refusal::into_status`].
#[derive(Clone, Debug)]
pub struct Refusal {
    code: Code,
    reason: ErrorReason,
    message: String,
    field: String,
    violations: Vec<FieldViolation>,
    retry_after_seconds: u32,
    attempts_remaining: u32,
}

impl Refusal {
    pub fn new(code: Code, reason: ErrorReason, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            field: String::new(),
            violations: Vec::new(),
            retry_after_seconds: 0,
            attempts_remaining: 0,
        }
    }

    /// The request field at fault (`challenge.checksum`); empty when none is.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = field.into();
        self
    }

    /// Field violations for `BadRequest`, when there are several (a template's policy). Without
    /// any, an INVALID_ARGUMENT with a field gets one violation: the field and the message.
    pub fn violations(mut self, violations: impl IntoIterator<Item = (String, String)>) -> Self {
        self.violations = violations
            .into_iter()
            .map(|(field, description)| FieldViolation::new(field, description))
            .collect();
        self
    }

    pub fn retry_after_seconds(mut self, seconds: u32) -> Self {
        self.retry_after_seconds = seconds;
        self
    }

    pub fn attempts_remaining(mut self, attempts: u32) -> Self {
        self.attempts_remaining = attempts;
        self
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The status, with its details in the error `domain` (`cms.custody`).
    pub fn into_status(self, domain: &str) -> tonic::Status {
        let reason = self.reason.as_str_name();
        let reason = reason.strip_prefix("ERROR_REASON_").unwrap_or(reason);
        let mut metadata = HashMap::new();
        if !self.field.is_empty() {
            metadata.insert("field".to_owned(), self.field.clone());
        }
        let mut details = vec![any(
            ErrorInfo::TYPE_URL,
            &pb::ErrorInfo::from(ErrorInfo::new(reason, domain, metadata)),
        )];
        let mut violations = self.violations;
        if violations.is_empty() && !self.field.is_empty() {
            violations.push(FieldViolation::new(&self.field, &self.message));
        }
        if self.code == Code::InvalidArgument && !violations.is_empty() {
            details.push(any(
                BadRequest::TYPE_URL,
                &pb::BadRequest::from(BadRequest::new(violations)),
            ));
        }
        if self.retry_after_seconds > 0 {
            let delay = Duration::from_secs(self.retry_after_seconds.into());
            details.push(any(
                RetryInfo::TYPE_URL,
                &pb::RetryInfo::from(RetryInfo::new(Some(delay))),
            ));
        }
        details.push(any(
            ERROR_DETAIL_TYPE_URL,
            &ErrorDetail {
                reason: self.reason as i32,
                field: self.field,
                message: self.message.clone(),
                retry_after_seconds: self.retry_after_seconds,
                attempts_remaining: self.attempts_remaining,
            },
        ));
        let status = pb::Status {
            code: self.code as i32,
            message: self.message.clone(),
            details,
        };
        tonic::Status::with_details(self.code, self.message, status.encode_to_vec().into())
    }
}

fn any(type_url: &str, message: &impl Message) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    }
}

/// The [`ErrorDetail`] a CMS status carries, if any.
pub fn detail(status: &tonic::Status) -> Option<ErrorDetail> {
    let rpc = pb::Status::decode(status.details()).ok()?;
    rpc.details
        .iter()
        .find(|d| d.type_url == ERROR_DETAIL_TYPE_URL)
        .and_then(|d| ErrorDetail::decode(d.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn a_stock_client_reads_reason_field_and_retry() {
        let status = Refusal::new(
            Code::InvalidArgument,
            ErrorReason::CodeChecksumMismatch,
            "challenge: the checksum does not match",
        )
        .field("challenge")
        .into_status("cms.custody");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "challenge: the checksum does not match");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "CODE_CHECKSUM_MISMATCH");
        assert_eq!(info.domain, "cms.custody");
        assert_eq!(info.metadata["field"], "challenge");
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "challenge");
        assert!(status.get_details_retry_info().is_none());
        let ours = detail(&status).expect("ErrorDetail");
        assert_eq!(ours.reason, ErrorReason::CodeChecksumMismatch as i32);
        assert_eq!(ours.field, "challenge");

        let busy = Refusal::new(Code::ResourceExhausted, ErrorReason::RateLimited, "busy")
            .retry_after_seconds(2)
            .into_status("cms.custody");
        let retry = busy.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(2)));
        assert!(busy.get_details_bad_request().is_none());
        assert_eq!(detail(&busy).unwrap().retry_after_seconds, 2);
    }

    #[test]
    fn several_violations_and_no_details_on_a_plain_status() {
        let status = Refusal::new(Code::InvalidArgument, ErrorReason::InvalidArgument, "bad")
            .field("a")
            .violations([("a".into(), "one".into()), ("b".into(), "two".into())])
            .into_status("cms.template");
        let bad = status.get_details_bad_request().unwrap();
        let fields: Vec<&str> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["a", "b"]);
        assert!(detail(&tonic::Status::internal("internal error")).is_none());
    }
}
