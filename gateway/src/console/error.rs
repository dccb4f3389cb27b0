//! How a refusal from the workflow (a `tonic::Status`) reaches the browser: the HTTP status
//! of Google's gRPC-to-HTTP mapping and a JSON body with the caller-safe message, our reason
//! code and the field at fault.
//!
//! Trouble behind the gateway (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) and
//! internal errors become plain sentences an operator can act on; their technical text stays
//! in the gateway's log.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cms_proto::common::v1::ErrorReason;
use serde::Serialize;
use tonic::Code;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after_seconds: u32,
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: ErrorFields,
}

#[derive(Debug, Serialize)]
struct ErrorFields {
    /// The gRPC code name, `PERMISSION_DENIED`.
    code: &'static str,
    /// Our reason, `CODE_CHECKSUM_MISMATCH`; empty when the service gave none.
    reason: String,
    /// The request field at fault, `challenge.checksum`; empty when none is.
    field: String,
    message: String,
    #[serde(skip_serializing_if = "is_zero")]
    retry_after_seconds: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Google's mapping of gRPC codes to HTTP statuses (google/rpc/code.proto).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn plain_retry_message(retry_after_seconds: u32) -> String {
    match retry_after_seconds {
        0 => "Too many requests right now. Wait a moment and try again.".to_owned(),
        1 => "Too many requests right now. Wait a second and try again.".to_owned(),
        n => format!("Too many requests right now. Wait {n} seconds and try again."),
    }
}

impl ApiError {
    /// A refusal of the console itself (bad JSON, an unknown action name), before any
    /// workflow code ran.
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                error: ErrorFields {
                    code: code_name(Code::InvalidArgument),
                    reason: "INVALID_ARGUMENT".to_owned(),
                    field: field.to_owned(),
                    message: message.into(),
                    retry_after_seconds: 0,
                },
            },
            retry_after_seconds: 0,
        }
    }

    pub fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            body: ErrorBody {
                error: ErrorFields {
                    code: code_name(Code::NotFound),
                    reason: "NOT_FOUND".to_owned(),
                    field: String::new(),
                    message: "no such page or API endpoint".to_owned(),
                    retry_after_seconds: 0,
                },
            },
            retry_after_seconds: 0,
        }
    }

    #[cfg(test)]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    #[cfg(test)]
    pub fn message(&self) -> &str {
        &self.body.error.message
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        let code = status.code();
        let detail = cms_kit::error_details::detail(&status);
        let (reason, field, retry_after_seconds) = match &detail {
            Some(d) => {
                let reason = ErrorReason::try_from(d.reason)
                    .unwrap_or(ErrorReason::Unspecified)
                    .as_str_name();
                let reason = reason.strip_prefix("ERROR_REASON_").unwrap_or(reason);
                let reason = if reason == "UNSPECIFIED" { "" } else { reason };
                (reason.to_owned(), d.field.clone(), d.retry_after_seconds)
            }
            None => (String::new(), String::new(), 0),
        };
        let message = match code {
            Code::Unavailable => {
                "A service behind the gateway is not available right now. Try again in a moment; \
                 if it keeps failing, tell the CMS administrator."
                    .to_owned()
            }
            Code::DeadlineExceeded => {
                "A service behind the gateway took too long to answer. Try again; if it keeps \
                 happening, tell the CMS administrator."
                    .to_owned()
            }
            Code::ResourceExhausted => plain_retry_message(retry_after_seconds),
            Code::Unknown | Code::Internal | Code::DataLoss => {
                "Something went wrong inside the gateway. The error was logged; tell the CMS \
                 administrator the time it happened."
                    .to_owned()
            }
            _ => status.message().to_owned(),
        };
        if matches!(
            code,
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
        ) {
            tracing::info!(
                code = code_name(code),
                message = status.message(),
                "console: trouble behind the gateway"
            );
        }
        Self {
            status: http_status(code),
            body: ErrorBody {
                error: ErrorFields {
                    code: code_name(code),
                    reason,
                    field,
                    message,
                    retry_after_seconds,
                },
            },
            retry_after_seconds,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.retry_after_seconds;
        let mut response = (self.status, Json(self.body)).into_response();
        if retry > 0 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cms_kit::error_details::Refusal;

    #[test]
    fn refusals_keep_message_reason_and_field() {
        let status = Refusal::new(
            Code::InvalidArgument,
            ErrorReason::CodeChecksumMismatch,
            "challenge: the checksum does not match the code; check both for a typing error",
        )
        .field("challenge.checksum")
        .into_status("cms.gateway");
        let err = ApiError::from(status);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.body.error.code, "INVALID_ARGUMENT");
        assert_eq!(err.body.error.reason, "CODE_CHECKSUM_MISMATCH");
        assert_eq!(err.body.error.field, "challenge.checksum");
        assert!(err.message().starts_with("challenge: the checksum"));

        let denied = ApiError::from(
            Refusal::new(
                Code::PermissionDenied,
                ErrorReason::PermissionDenied,
                "operator bob lacks the helpdesk role",
            )
            .into_status("cms.gateway"),
        );
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        assert_eq!(denied.message(), "operator bob lacks the helpdesk role");
        assert_eq!(
            ApiError::from(tonic::Status::failed_precondition("offline unblock is off")).status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn trouble_behind_the_gateway_becomes_plain_text() {
        let cases = [
            (
                tonic::Status::unavailable("tcp connect error: 127.0.0.1:4 refused"),
                StatusCode::SERVICE_UNAVAILABLE,
                "not available right now",
            ),
            (
                tonic::Status::deadline_exceeded("custody: deadline 2s elapsed"),
                StatusCode::GATEWAY_TIMEOUT,
                "took too long",
            ),
            (
                tonic::Status::internal("sqlx: database is locked"),
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
            ),
        ];
        for (status, http, plain) in cases {
            let technical = status.message().to_owned();
            let err = ApiError::from(status);
            assert_eq!(err.status(), http);
            assert!(err.message().contains(plain), "{}", err.message());
            assert!(!err.message().contains(&technical));
        }
        let busy = Refusal::new(
            Code::ResourceExhausted,
            ErrorReason::RateLimited,
            "per-operator limit 10/min hit",
        )
        .retry_after_seconds(7)
        .into_status("cms.gateway");
        let response = ApiError::from(busy).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
