//! The tracking API's answers: exactly `200 {"success":true}` when every message was stored
//! (one library re-sends a batch on any other 2xx), otherwise a JSON body with `code` and
//! `message` (the fields Segment's libraries read) and, for refused messages, one entry per
//! violation with the message's `index` and the `field`.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;
use tessera_core::FieldViolation;

use super::body::MAX_BODY_BYTES;
use super::wire::MAX_MESSAGE_BYTES;
use crate::IngestError;

/// Why a whole request failed; nothing of it was stored.
#[derive(Debug)]
pub(super) enum Failure {
    /// The body is not JSON, not an object, or not decodable.
    Malformed(String),
    /// The request's own fields (`batch`, envelope `context`, `sentAt`, `writeKey`) are wrong.
    Envelope(Vec<FieldViolation>),
    /// A `Content-Encoding` other than gzip.
    UnsupportedEncoding(String),
    /// The body is over [`MAX_BODY_BYTES`], raw or decompressed.
    BodyTooLarge {
        /// Whether it was the decompressed body.
        decompressed: bool,
    },
    /// The batch has more messages than allowed.
    TooManyMessages {
        /// Messages in the request.
        got: usize,
        /// The limit.
        limit: usize,
    },
    /// Authentication, the rate limit, or storing failed.
    Ingest(IngestError),
}

impl From<IngestError> for Failure {
    fn from(e: IngestError) -> Self {
        Self::Ingest(e)
    }
}

/// One refused message's violation.
#[derive(Debug)]
struct Entry {
    index: usize,
    field: String,
    message: String,
}

/// The messages of a request that were refused while the others were stored.
#[derive(Debug, Default)]
pub(super) struct Refused {
    /// Messages in the request.
    pub(super) total: usize,
    /// Messages stored (new or duplicates).
    pub(super) accepted: usize,
    entries: Vec<Entry>,
    too_large: bool,
}

impl Refused {
    /// Records a violation of message `index`.
    pub(super) fn invalid(&mut self, index: usize, field: String, message: String) {
        self.entries.push(Entry {
            index,
            field,
            message,
        });
    }

    /// Records message `index` as over the size limit.
    pub(super) fn too_large(&mut self, index: usize, field: String, size: usize) {
        self.too_large = true;
        self.entries.push(Entry {
            index,
            field,
            message: format!(
                "the message is {size} bytes, over the limit of 32 KB ({MAX_MESSAGE_BYTES} bytes) per message"
            ),
        });
    }

    /// Whether nothing was refused.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The answer to a request.
pub(super) fn render(result: Result<Refused, Failure>) -> Response {
    match result {
        Ok(refused) if refused.is_empty() => answer(StatusCode::OK, json!({"success": true})),
        Ok(refused) => {
            let count = refused.total - refused.accepted;
            let (status, code) = if refused.too_large {
                (StatusCode::PAYLOAD_TOO_LARGE, "message_too_large")
            } else {
                (StatusCode::BAD_REQUEST, "invalid_messages")
            };
            let errors: Vec<_> = refused
                .entries
                .iter()
                .map(|e| json!({"index": e.index, "field": e.field, "message": e.message}))
                .collect();
            answer(
                status,
                json!({
                    "success": false,
                    "code": code,
                    "message": format!(
                        "{count} of {} messages refused, the other {} accepted; \
                         do not re-send the refused ones unchanged",
                        refused.total, refused.accepted
                    ),
                    "accepted": refused.accepted,
                    "refused": count,
                    "errors": errors,
                }),
            )
        }
        Err(failure) => render_failure(failure),
    }
}

fn render_failure(failure: Failure) -> Response {
    match failure {
        Failure::Malformed(message) => fail(StatusCode::BAD_REQUEST, "malformed_body", &message),
        Failure::Envelope(violations) => {
            let errors: Vec<_> = violations
                .iter()
                .map(|v| json!({"field": v.field, "message": v.description}))
                .collect();
            let message = violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            answer(
                StatusCode::BAD_REQUEST,
                json!({"success": false, "code": "invalid_request", "message": message,
                       "errors": errors}),
            )
        }
        Failure::UnsupportedEncoding(coding) => fail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            &format!("Content-Encoding {coding:?} is not supported: send gzip or no encoding"),
        ),
        Failure::BodyTooLarge { decompressed } => {
            let which = if decompressed {
                "the decompressed request body"
            } else {
                "the request body"
            };
            too_large(
                "request_too_large",
                &format!(
                    "{which} exceeds the limit of 500 KB ({MAX_BODY_BYTES} bytes) per request"
                ),
                "500 KB per request",
            )
        }
        Failure::TooManyMessages { got, limit } => too_large(
            "too_many_messages",
            &format!("the batch has {got} messages, over the limit of {limit} per request"),
            &format!("{limit} messages per request"),
        ),
        Failure::Ingest(e) => render_ingest(e),
    }
}

fn render_ingest(e: IngestError) -> Response {
    let status = tessera_server::http_status(e.code());
    match &e {
        IngestError::Invalid(violations) => render_failure(Failure::Envelope(violations.clone())),
        IngestError::TooLarge { got, limit } => render_failure(Failure::TooManyMessages {
            got: *got,
            limit: *limit,
        }),
        IngestError::Unauthenticated => fail(
            status,
            "unauthenticated",
            "a valid write key is required: send it as the HTTP Basic user name with an empty \
             password, or as writeKey in the body (the key is unknown, disabled or missing)",
        ),
        IngestError::RateLimited { retry_after } => {
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let seconds = seconds.max(1);
            let mut response = answer(
                status,
                json!({"success": false, "code": "rate_limited",
                       "message": format!("over the rate limit, retry after {seconds} s"),
                       "retryAfter": seconds}),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
        IngestError::Store(_) | IngestError::Encode(_) => {
            // Logged once here with its source chain; the client sees only the code's message.
            let status_message = tessera_server::internal(e.code(), &e);
            let code = if status == StatusCode::SERVICE_UNAVAILABLE {
                "unavailable"
            } else {
                "internal"
            };
            let mut response = fail(status, code, status_message.message());
            if e.code().is_retryable() {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            response
        }
    }
}

fn too_large(code: &str, message: &str, limit: &str) -> Response {
    answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        json!({"success": false, "code": code, "message": message, "limit": limit}),
    )
}

fn fail(status: StatusCode, code: &str, message: &str) -> Response {
    answer(
        status,
        json!({"success": false, "code": code, "message": message}),
    )
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    // The browser library posts cross-origin (as text/plain, so without a preflight).
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// The CORS preflight of a browser sending an `Authorization` or `Content-Encoding` header.
pub(super) async fn preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, Content-Encoding"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}
