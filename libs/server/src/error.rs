//! The one mapping of error codes to gRPC statuses and HTTP status codes.

use std::time::Duration;

use tessera_core::{ErrorCode, FieldViolation};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The gRPC code of an error code.
fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::Internal => Code::Internal,
    }
}

/// The HTTP status of an error code.
pub fn http_status(code: ErrorCode) -> http::StatusCode {
    match code {
        ErrorCode::InvalidArgument => http::StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => http::StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists => http::StatusCode::CONFLICT,
        ErrorCode::ResourceExhausted => http::StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unauthenticated => http::StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => http::StatusCode::FORBIDDEN,
        ErrorCode::FailedPrecondition => http::StatusCode::CONFLICT,
        ErrorCode::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// How long a client should wait before retrying a retryable error.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// A status for `code` with a client-safe `message`. Retryable codes carry a `RetryInfo`
/// detail. Never pass internal error text as `message`: use [`internal`] for those.
pub fn status(code: ErrorCode, message: impl Into<String>) -> Status {
    if code.is_retryable() {
        let details = ErrorDetails::with_retry_info(Some(RETRY_DELAY));
        Status::with_error_details(grpc_code(code), message, details)
    } else {
        Status::new(grpc_code(code), message)
    }
}

/// A retryable status for `code` whose `RetryInfo` says to wait `retry_after` (for example the
/// time until a rate limit refills).
pub fn status_with_retry(
    code: ErrorCode,
    message: impl Into<String>,
    retry_after: Duration,
) -> Status {
    let details = ErrorDetails::with_retry_info(Some(retry_after));
    Status::with_error_details(grpc_code(code), message, details)
}

/// INVALID_ARGUMENT with a `BadRequest` detail naming every violated field; the message lists
/// them too, for clients that do not decode details.
pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let message = violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let details = ErrorDetails::with_bad_request(
        violations
            .iter()
            .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// Logs an internal error once, with its source chain, and returns a status that says nothing
/// of it beyond its code.
pub fn internal(code: ErrorCode, error: &(dyn std::error::Error + 'static)) -> Status {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    match code {
        ErrorCode::Unavailable | ErrorCode::ResourceExhausted => {
            tracing::warn!(error = %chain, "dependency unavailable");
            status(code, "a dependency is unavailable, retry later")
        }
        ErrorCode::InvalidArgument
        | ErrorCode::NotFound
        | ErrorCode::AlreadyExists
        | ErrorCode::Unauthenticated
        | ErrorCode::PermissionDenied
        | ErrorCode::FailedPrecondition
        | ErrorCode::Internal => {
            tracing::error!(error = %chain, "internal error");
            status(code, "internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_fields() {
        let s = invalid_argument(&[FieldViolation::new("events[2].user_id", "required")]);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("events[2].user_id"));
        let details = s.get_error_details();
        let bad = details.bad_request().expect("bad request detail");
        assert_eq!(bad.field_violations[0].field, "events[2].user_id");
    }

    #[test]
    fn retryable_statuses_carry_retry_info() {
        let s = status(ErrorCode::Unavailable, "down");
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.get_error_details().retry_info().is_some());
        assert!(
            status(ErrorCode::NotFound, "x")
                .get_error_details()
                .retry_info()
                .is_none()
        );
    }

    #[test]
    fn internal_errors_do_not_leak() {
        let err = std::io::Error::other("relation \"profiles\" does not exist");
        let s = internal(ErrorCode::Internal, &err);
        assert_eq!(s.message(), "internal error");
    }
}
