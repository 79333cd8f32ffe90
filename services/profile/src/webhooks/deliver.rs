//! One webhook request: the JSON body, its HMAC signature, the POST, and what the answer means
//! (delivered, refused for good, or worth retrying); and the retry schedule.

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::store::ProfileChange;

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "x-tessera-signature";
/// The header naming the webhook (its configured name), so one receiver can tell its webhooks
/// (and their secrets) apart.
pub const WEBHOOK_ID_HEADER: &str = "x-tessera-webhook-id";
/// The most of a response body read (and thrown away, so the connection can be reused).
const MAX_RESPONSE: usize = 64 * 1024;

/// The HTTP(S) client every webhook of a process shares.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for `http://` and `https://` URLs (rustls with ring, Mozilla's roots).
pub(crate) fn client() -> HttpClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    // The ring provider supports every protocol version rustls offers, so this never fails;
    // naming it keeps the client working if another provider is ever linked in.
    let builder = match builder.with_provider_and_webpki_roots(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    )) {
        Ok(builder) => builder,
        Err(e) => {
            tracing::error!(error = %e, "tls provider unusable, using the default one");
            hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots()
        }
    };
    let connector = builder.https_or_http().enable_http1().build();
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// A change as the webhook payload carries it: its cursor as `id`, its kind, profile and time,
/// and the fields of its kind (named as `WatchProfileChanges` names them).
pub(crate) fn change_json(change: &ProfileChange) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    out.insert("id".into(), change.cursor.to_string().into());
    out.insert("kind".into(), change.kind.clone().into());
    out.insert("profile_id".into(), change.profile_id.clone().into());
    out.insert(
        "at".into(),
        change.at.format(&Rfc3339).unwrap_or_default().into(),
    );
    // Only the fields the stream defines: anything else a change's detail may hold later is
    // not sent until someone decides it should be.
    for (from, to) in [
        ("version", "version"),
        ("into", "merged_into"),
        ("audience", "audience"),
        ("score", "score"),
        ("value", "score_value"),
        ("profile_ids", "deleted_profile_ids"),
    ] {
        if let Some(value) = change.detail.get(from) {
            out.insert(to.into(), value.clone());
        }
    }
    serde_json::Value::Object(out)
}

/// The request body: `{"webhook": name, "changes": [...]}`.
pub(crate) fn body(webhook: &str, changes: Vec<serde_json::Value>) -> Bytes {
    let body = serde_json::json!({ "webhook": webhook, "changes": changes });
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// The signature header's value for `body` sent at `t` (unix seconds).
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("hmac accepts any key length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// An answer that retrying will not change (4xx but 408 and 429, 3xx, 1xx): dead-letter.
    Refused(String),
    /// A 5xx, 408 or 429, a timeout or a connection failure: retry, not before `after` when
    /// the destination said so (`Retry-After` in seconds).
    Failed {
        /// Why.
        error: String,
        /// The destination's `Retry-After`.
        after: Option<Duration>,
    },
}

/// POSTs `body` to `url`, signed with `secret`, within `timeout`.
pub(crate) async fn post(
    client: &HttpClient,
    url: &http::Uri,
    webhook: &str,
    secret: &[u8],
    body: Bytes,
    timeout: Duration,
) -> Outcome {
    let t = OffsetDateTime::now_utc().unix_timestamp();
    let signed = signature(secret, t, &body);
    let mut request = Request::post(url.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "tessera-webhooks/1")
        .header(SIGNATURE_HEADER, signed);
    if let Ok(name) = HeaderValue::from_str(webhook) {
        request = request.header(WEBHOOK_ID_HEADER, name);
    }
    let request = match request.body(Full::new(body)) {
        Ok(request) => request,
        Err(e) => return Outcome::Refused(format!("invalid request: {e}")),
    };
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (a bounded part of) the body so the connection can be reused; its content is
        // never kept or logged.
        let _ = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await;
        Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Outcome::Failed {
            error: format!("timed out after {} ms", timeout.as_millis()),
            after: None,
        },
        Ok(Err(e)) => Outcome::Failed {
            error: connection_error(&e),
            after: None,
        },
        Ok(Ok((status, after))) => classify(status, after),
    }
}

/// The error and its sources, which say what failed (refused, DNS, TLS), without the URL.
fn connection_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn classify(status: StatusCode, after: Option<Duration>) -> Outcome {
    if status.is_success() {
        Outcome::Delivered
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Outcome::Failed {
            error: format!("HTTP {}", status.as_u16()),
            after,
        }
    } else {
        // Redirects are not followed: the signed body goes only where it was configured to.
        Outcome::Refused(format!("HTTP {}", status.as_u16()))
    }
}

/// The delay before attempt `attempts + 1` after `attempts` failures: `initial` doubling up to
/// `max`, times a random factor in [0.5, 1] so that destinations coming back are not hit by
/// every webhook at once.
pub(crate) fn backoff(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let doubling = 2u32.saturating_pow(attempts.saturating_sub(1).min(31));
    let base = initial.saturating_mul(doubling).min(max);
    base.mul_f64(rand::random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChangeCursor;
    use serde_json::json;

    #[test]
    fn the_signature_is_stripe_style_hmac_sha256() {
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let s = signature(b"Jefe", 0, b"what do ya want for nothing?");
        assert!(s.starts_with("t=0,v1="), "{s}");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(s, format!("t=0,v1={want}"));
        assert_ne!(
            signature(b"Jefe", 1, b"x"),
            signature(b"Jefe", 2, b"x"),
            "the time is signed"
        );
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(StatusCode::OK, None), Outcome::Delivered);
        assert_eq!(classify(StatusCode::NO_CONTENT, None), Outcome::Delivered);
        for refused in [400, 401, 404, 410, 422, 301] {
            let status = StatusCode::from_u16(refused).unwrap();
            assert!(
                matches!(classify(status, None), Outcome::Refused(_)),
                "{refused}"
            );
        }
        for retried in [408, 429, 500, 502, 503] {
            let status = StatusCode::from_u16(retried).unwrap();
            assert!(
                matches!(classify(status, None), Outcome::Failed { .. }),
                "{retried}"
            );
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_retries_for_hours() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(600));
        for attempts in 1..40 {
            let d = backoff(attempts, initial, max);
            let base = initial
                .saturating_mul(2u32.saturating_pow((attempts - 1).min(31)))
                .min(max);
            assert!(d <= base && d >= base / 2, "{attempts}: {d:?}");
        }
        // The defaults keep retrying for 4 hours: the worst case (no jitter) needs this many.
        let mut total = Duration::ZERO;
        let mut n = 0;
        while total < Duration::from_secs(4 * 3600) {
            n += 1;
            total += initial
                .saturating_mul(2u32.saturating_pow((n - 1).min(31)))
                .min(max);
        }
        assert!(n > 20, "{n}");
    }

    #[test]
    fn a_change_carries_its_fields_under_the_stream_names() {
        let change = ProfileChange {
            cursor: ChangeCursor { xid: 7, seq: 42 },
            profile_id: "p1".into(),
            kind: "merged".into(),
            detail: json!({"into": "p0", "secret_new_field": 1}),
            at: time::macros::datetime!(2026-05-01 00:00:00.5 UTC),
        };
        assert_eq!(
            change_json(&change),
            json!({"id": "7.42", "kind": "merged", "profile_id": "p1",
                   "at": "2026-05-01T00:00:00.5Z", "merged_into": "p0"})
        );
    }
}
