//! The Segment-compatible HTTP tracking API: `POST /v1/{identify,track,page,screen,group,alias}`,
//! `/v1/batch` and `/v1/import`, and the browser library's short routes (`/v1/i` … `/v1/b`).
//!
//! A request is authenticated (write key as the HTTP Basic user, or `writeKey` in the body),
//! read within bounds (500 KB raw and decompressed), parsed leniently into domain events
//! ([`wire`]), checked against the source's rate limit, and the valid messages are stored
//! durably before the answer. The source's tracking plan applies to the valid messages
//! ([`crate::plans`]): in `block` mode a violating message is refused like an invalid one, its
//! entries naming the field, the schema and the failing rule. Partial batches: the valid messages of a batch are stored even
//! when others are refused; the answer is then 400 (or 413 when a refused message is over
//! 32 KB) listing each refused message by index and field. A library that re-sends the batch
//! on that answer re-sends only duplicates, which ingestion drops by message id; no valid
//! message is ever silently dropped.

mod body;
mod response;
mod wire;

pub(crate) use self::wire::{MAX_MESSAGE_BYTES, compact_len, nul_path};

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use http::HeaderMap;
use serde_json::{Map, Value};
use tessera_core::{EventType, FieldViolation};
use time::OffsetDateTime;

use self::body::{BodyError, MAX_BODY_BYTES};
use self::response::{Failure, Refused};
use self::wire::Refusal;
use crate::Ingestion;
use crate::sources::{Source, key};

/// What a route accepts.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// One message of this type.
    Single(EventType),
    /// `{"batch": [...]}`, each message with its own `type`.
    Batch,
}

/// The HTTP routes of the tracking API.
pub(crate) fn routes(ingestion: Ingestion) -> tessera_server::HttpRouter {
    let table: [(&[&str], Route); 7] = [
        (
            &["/v1/identify", "/v1/i"],
            Route::Single(EventType::Identify),
        ),
        (&["/v1/track", "/v1/t"], Route::Single(EventType::Track)),
        (&["/v1/page", "/v1/p"], Route::Single(EventType::Page)),
        (&["/v1/screen", "/v1/s"], Route::Single(EventType::Screen)),
        (&["/v1/group", "/v1/g"], Route::Single(EventType::Group)),
        (&["/v1/alias", "/v1/a"], Route::Single(EventType::Alias)),
        (&["/v1/batch", "/v1/b", "/v1/import"], Route::Batch),
    ];
    let mut router = axum::Router::new();
    for (paths, route) in table {
        for path in paths {
            router = router.route(
                path,
                post(
                    move |State(ingestion): State<Ingestion>, request: axum::extract::Request| {
                        let (parts, body) = request.into_parts();
                        let ip = client_ip(&parts);
                        accept(ingestion, route, parts.headers, body, ip)
                    },
                )
                .options(response::preflight),
            );
        }
    }
    router.with_state(ingestion)
}

/// Reads one Segment-format message, as `/v1/batch` reads each element of its `batch` (with its
/// own `type`), into a domain event; every violation otherwise, named as in the JSON. For tools
/// that load Segment exports, such as `tessera import`.
pub fn segment_message(value: Value) -> Result<tessera_core::Event, Vec<FieldViolation>> {
    let received_at = OffsetDateTime::now_utc();
    match wire::message(value, None, &wire::Envelope::default(), received_at) {
        Ok(event) => Ok(event),
        Err(Refusal::Invalid(violations)) => Err(violations),
        Err(Refusal::TooLarge(size)) => Err(vec![FieldViolation::new(
            "",
            format!(
                "the message is {size} bytes, over the limit of {} bytes",
                wire::MAX_MESSAGE_BYTES
            ),
        )]),
    }
}

/// The client's address as Segment records it in `context.ip`: the first `X-Forwarded-For`
/// entry when a proxy in front of Tessera set one, else the connection's peer address.
fn client_ip(parts: &http::request::Parts) -> Option<std::net::IpAddr> {
    let forwarded = parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|first| first.trim().parse().ok());
    forwarded.or_else(|| {
        parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip())
    })
}

async fn accept(
    ingestion: Ingestion,
    route: Route,
    headers: HeaderMap,
    body: Body,
    client_ip: Option<std::net::IpAddr>,
) -> Response {
    let received_at = OffsetDateTime::now_utc();
    let result = ingestion
        .accept_http(route, &headers, body, received_at, client_ip)
        .await;
    let response = response::render(result);
    metrics::counter!(
        "tessera_ingestion_http_requests_total",
        "status" => response.status().as_str().to_owned()
    )
    .increment(1);
    response
}

impl Ingestion {
    /// Handles one tracking API request: `Ok` with the refused messages (none: all stored).
    async fn accept_http(
        &self,
        route: Route,
        headers: &HeaderMap,
        body: Body,
        received_at: OffsetDateTime,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<Refused, Failure> {
        // The body is read (within bounds) even for a bad key in the header: answering before
        // the upload ends makes clients see a reset instead of the 401, and retry.
        let raw = body::read(body, MAX_BODY_BYTES)
            .await
            .map_err(body_failure)?;
        // A key in the Authorization header is checked before any decoding or parsing.
        let header_source = match basic_write_key(headers) {
            Some(key) => Some(self.authenticate(&key).await?),
            None => None,
        };
        let object = parse_body(headers, raw)?;
        let batch = matches!(route, Route::Batch);
        let mut envelope = wire::envelope(&object, batch).map_err(Failure::Envelope)?;
        // Like Segment, the request's address is the context.ip of messages that carry none.
        if let Some(ip) = client_ip {
            envelope
                .context
                .entry("ip")
                .or_insert_with(|| Value::String(ip.to_string()));
        }
        let source = match header_source {
            Some(source) => source,
            None => {
                let key = envelope.write_key.as_deref().unwrap_or("");
                self.authenticate(key).await?
            }
        };
        let (messages, prefix) = messages_of(route, object, self.settings.max_batch)?;
        self.check_rate(&source, messages.len())?;
        self.store_messages(&source, route, messages, prefix, &envelope, received_at)
            .await
    }

    /// Converts the messages and stores the valid ones in one append; returns the refused.
    async fn store_messages(
        &self,
        source: &Source,
        route: Route,
        messages: Vec<Value>,
        prefix: Option<&str>,
        envelope: &wire::Envelope,
        received_at: OffsetDateTime,
    ) -> Result<Refused, Failure> {
        let total = messages.len();
        let (valid, mut refused) = convert(route, messages, prefix, envelope, received_at);
        // The tracking plan: blocked messages are quarantined and refused like invalid ones.
        let screened = self.screen(source, valid, received_at).await?;
        for (index, _, violations) in screened.blocked {
            for v in violations {
                let field = match prefix {
                    Some(p) => format!("{p}[{index}].{}", v.field),
                    None => v.field,
                };
                refused.invalid(index, field, v.description);
            }
        }
        let valid: Vec<_> = screened.passed.into_iter().map(|(_, e)| e).collect();
        refused.accepted = valid.len();
        refused.total = total;
        if !refused.is_empty() {
            tracing::debug!(
                source = %source.id,
                refused = total - valid.len(),
                accepted = valid.len(),
                "tracking api refused messages"
            );
            metrics::counter!("tessera_ingestion_http_refused_messages_total")
                .increment((total - valid.len()) as u64);
        }
        if !valid.is_empty() {
            self.store(&source.id.to_string(), valid, received_at)
                .await?;
        }
        Ok(refused)
    }
}

/// The JSON object of a raw request body: decoded as its `Content-Encoding` says (within
/// [`MAX_BODY_BYTES`]), a leading byte-order mark dropped, parsed.
fn parse_body(headers: &HeaderMap, raw: Vec<u8>) -> Result<Map<String, Value>, Failure> {
    let decoded = body::decode(headers, raw, MAX_BODY_BYTES).map_err(body_failure)?;
    // Some clients start their UTF-8 with a byte-order mark, which JSON does not allow.
    let json = decoded.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&decoded);
    let parsed: Value = serde_json::from_slice(json)
        .map_err(|e| Failure::Malformed(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(object) = parsed else {
        return Err(Failure::Malformed(
            "the body must be a JSON object".to_owned(),
        ));
    };
    Ok(object)
}

/// The messages of a request body (the body itself on a single-message route, its `batch`
/// otherwise, at most `max_batch`) and the prefix their violations are named under.
fn messages_of(
    route: Route,
    mut object: Map<String, Value>,
    max_batch: usize,
) -> Result<(Vec<Value>, Option<&'static str>), Failure> {
    let (messages, prefix) = match route {
        Route::Single(_) => (vec![Value::Object(object)], None),
        Route::Batch => match object.remove("batch") {
            Some(Value::Array(items)) => (items, Some("batch")),
            None | Some(Value::Null) => {
                return Err(Failure::Envelope(vec![FieldViolation::new(
                    "batch",
                    "required: an array of messages",
                )]));
            }
            Some(_) => {
                return Err(Failure::Envelope(vec![FieldViolation::new(
                    "batch",
                    "must be an array of messages",
                )]));
            }
        },
    };
    if messages.len() > max_batch {
        return Err(Failure::TooManyMessages {
            got: messages.len(),
            limit: max_batch,
        });
    }
    Ok((messages, prefix))
}

/// Converts each message into a domain event: the valid ones with their index, and the
/// refused ones named by index and field.
fn convert(
    route: Route,
    messages: Vec<Value>,
    prefix: Option<&str>,
    envelope: &wire::Envelope,
    received_at: OffsetDateTime,
) -> (Vec<(usize, tessera_core::Event)>, Refused) {
    let kind = match route {
        Route::Single(kind) => Some(kind),
        Route::Batch => None,
    };
    let mut valid = Vec::with_capacity(messages.len());
    let mut refused = Refused::default();
    for (index, value) in messages.into_iter().enumerate() {
        let path = |field: &str| match (prefix, field.is_empty()) {
            (Some(p), true) => format!("{p}[{index}]"),
            (Some(p), false) => format!("{p}[{index}].{field}"),
            (None, _) => field.to_owned(),
        };
        match wire::message(value, kind, envelope, received_at) {
            Ok(event) => valid.push((index, event)),
            Err(Refusal::Invalid(violations)) => {
                for v in violations {
                    refused.invalid(index, path(&v.field), v.description);
                }
            }
            Err(Refusal::TooLarge(size)) => refused.too_large(index, path(""), size),
        }
    }
    (valid, refused)
}

/// The tracking API's parsing, for the fuzz target `http_body` (`fuzz/`): everything a request
/// goes through that needs no database, exactly as [`Ingestion::accept_http`] does it. The
/// first byte picks the route (its low bits) and whether the rest is gzip (`0x80`). Returns how
/// many messages became events.
#[doc(hidden)]
pub fn fuzz_body(data: &[u8]) -> usize {
    const ROUTES: [Route; 7] = [
        Route::Single(EventType::Identify),
        Route::Single(EventType::Track),
        Route::Single(EventType::Page),
        Route::Single(EventType::Screen),
        Route::Single(EventType::Group),
        Route::Single(EventType::Alias),
        Route::Batch,
    ];
    let Some((&selector, raw)) = data.split_first() else {
        return 0;
    };
    let route = ROUTES[usize::from(selector & 0x7f) % ROUTES.len()];
    let mut headers = HeaderMap::new();
    if selector & 0x80 != 0 {
        headers.insert(
            http::header::CONTENT_ENCODING,
            http::HeaderValue::from_static("gzip"),
        );
    }
    let received_at = OffsetDateTime::now_utc();
    let Ok(object) = parse_body(&headers, raw.to_vec()) else {
        return 0;
    };
    let Ok(envelope) = wire::envelope(&object, matches!(route, Route::Batch)) else {
        return 0;
    };
    let max_batch = crate::IngestionSettings::default().max_batch;
    let Ok((messages, prefix)) = messages_of(route, object, max_batch) else {
        return 0;
    };
    let total = messages.len();
    let (valid, refused) = convert(route, messages, prefix, &envelope, received_at);
    assert!(valid.len() <= total, "more events than messages");
    assert!(
        valid.len() == total || !refused.is_empty(),
        "a message was neither converted nor refused"
    );
    drop(response::render(Ok(refused)));
    valid.len()
}

/// The write key of an `Authorization: Basic base64(key:)` header: the user name, whatever the
/// password. `None` without such a header.
fn basic_write_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    key::from_basic_auth(value)
}

fn body_failure(e: BodyError) -> Failure {
    match e {
        BodyError::TooLarge => Failure::BodyTooLarge {
            decompressed: false,
        },
        BodyError::InflatesTooLarge => Failure::BodyTooLarge { decompressed: true },
        BodyError::UnsupportedEncoding(coding) => Failure::UnsupportedEncoding(coding),
        BodyError::BadGzip => Failure::Malformed(
            "the body is not a valid gzip stream (Content-Encoding: gzip)".into(),
        ),
        BodyError::Broken => Failure::Malformed("the request body could not be read".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn the_write_key_is_the_basic_user() {
        // base64("TEST_WRITE_KEY:"), as the libraries send it.
        assert_eq!(
            basic_write_key(&auth("Basic VEVTVF9XUklURV9LRVk6")).as_deref(),
            Some("TEST_WRITE_KEY")
        );
        // base64("key:secret"): the password is ignored.
        assert_eq!(
            basic_write_key(&auth("basic a2V5OnNlY3JldA==")).as_deref(),
            Some("key")
        );
        assert_eq!(basic_write_key(&auth("Bearer abc")), None);
        assert_eq!(basic_write_key(&auth("Basic !!!")), None);
        assert_eq!(basic_write_key(&auth("Basic Og==")), None, "empty user");
        assert_eq!(basic_write_key(&HeaderMap::new()), None);
    }
}
