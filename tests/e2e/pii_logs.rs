//! Personal data stays out of the logs: a full pipeline run with every log at debug level, then
//! reads, an export and a deletion by email, leaves no email, phone or name that was sent in
//! what the process wrote.

use std::time::Duration;

use serde_json::json;
use tessera_proto::common::v1::Identifier;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{
    DeleteProfileRequest, ExportProfileRequest, delete_profile_request, export_profile_request,
};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{identify, send, track, wait_for};

const EMAIL: &str = "quillon.pii-probe@example.org";
const PHONE: &str = "+14155550187";
const PHONE_DIGITS: &str = "4155550187";
const FIRST: &str = "Quillonette";
const LAST: &str = "Zyxwarbler";

fn email_identifier() -> Identifier {
    Identifier {
        r#type: "email".to_owned(),
        value: EMAIL.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debug_log_of_a_full_pipeline_run_holds_no_email_phone_or_name() {
    full_run(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exported_traces_and_their_logs_hold_no_email_phone_or_name() {
    let receiver = crate::tracing::Receiver::default();
    let addr = receiver.start().await;
    full_run(Some(format!("http://{addr}"))).await;
    let spans = receiver.all();
    assert!(
        spans.iter().any(|s| s.name == "profile.apply_event"),
        "the run was traced: {spans:?}"
    );
    for span in &spans {
        let text = format!("{} {:?}", span.name, span.attributes).to_lowercase();
        for needle in [EMAIL, PHONE, PHONE_DIGITS, FIRST, LAST] {
            assert!(
                !text.contains(&needle.to_lowercase()),
                "{needle:?} in an exported span: {span:?}"
            );
        }
    }
}

/// Runs the pipeline and the privacy paths with debug logs captured (and traces exported to
/// `otlp` when given), then checks the log.
async fn full_run(otlp: Option<String>) {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("tessera.log");
    let mut builder = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().join("db").to_str().unwrap()])
        .env("TESSERA__TELEMETRY__LOG_FILTER", "debug")
        .stderr_to(&log);
    if let Some(endpoint) = otlp {
        builder = builder.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    }
    let mut tessera = builder.start().await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let name = format!("{FIRST} {LAST}");

    // gRPC: identify with every kind of personal trait, a track carrying them as properties,
    // and a message the ingestion refuses (its values must not be logged either).
    let statuses = send(
        &channel,
        &key,
        vec![
            identify(
                "pii-1",
                "pii-user-1",
                "pii-anon-1",
                json!({
                    "email": EMAIL,
                    "phone": PHONE,
                    "name": name,
                    "first_name": FIRST,
                    "last_name": LAST,
                }),
            ),
            track(
                "pii-2",
                "pii-user-1",
                "",
                "Order Completed",
                json!({"revenue": 12.5, "contact_email": EMAIL, "shipping_name": name}),
            ),
        ],
    )
    .await
    .unwrap();
    assert_eq!(statuses.len(), 2);
    // Another device of the same person, known by phone first, then by the same email: the
    // identity graph links (or merges) the two.
    send(
        &channel,
        &key,
        vec![
            identify(
                "pii-5",
                "",
                "pii-anon-2",
                json!({"phone": PHONE, "name": name}),
            ),
            identify("pii-6", "", "pii-anon-2", json!({"email": EMAIL})),
        ],
    )
    .await
    .unwrap();
    let refused = send(
        &channel,
        &key,
        vec![track("pii-3", "", "", "No Ids", json!({"email": EMAIL}))],
    )
    .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);

    // HTTP tracking API: the same person again, with the email in the context too.
    let body = json!({
        "userId": "pii-user-1",
        "event": "Viewed",
        "properties": {"phone": PHONE},
        "context": {"traits": {"email": EMAIL, "name": name}},
        "messageId": "pii-4",
    })
    .to_string();
    let auth = base64_basic(&key);
    let request = format!(
        "POST /v1/track HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        tessera.http_addr,
        body.len()
    );
    let response = raw_http(&tessera.http_addr, &request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // The pipeline runs through identity, profile and scoring.
    let profile = wait_for(&channel, "email", EMAIL, Duration::from_secs(30), |p| {
        p.event_count >= 3
    })
    .await;
    assert!(!profile.profile_id.is_empty());

    // Reads by email: the Profile API (the email is in the path) and an export.
    let token = tessera.access_token.clone().expect("dev token");
    let (status, _, _) = tessera_tests::http::get(
        &tessera.http_addr,
        &format!("/v1/spaces/default/collections/users/profiles/email:{EMAIL}/traits"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = tessera_tests::http::get(
        &tessera.http_addr,
        &format!("/v1/spaces/default/collections/users/profiles/phone:{PHONE}/nope"),
        Some(&token),
    )
    .await;
    assert!(status >= 400);
    let mut profiles = ProfileServiceClient::new(channel.clone());
    profiles
        .export_profile(ExportProfileRequest {
            lookup: Some(export_profile_request::Lookup::Identifier(
                email_identifier(),
            )),
        })
        .await
        .unwrap();
    // Deleting the person by email (the privacy path through identity and the event log).
    profiles
        .delete_profile(DeleteProfileRequest {
            lookup: Some(delete_profile_request::Lookup::Identifier(
                email_identifier(),
            )),
            reason: "erasure request".to_owned(),
        })
        .await
        .unwrap();
    // A malformed identifier value is refused; the refusal is not logged with the value.
    let _ = profiles
        .export_profile(ExportProfileRequest {
            lookup: Some(export_profile_request::Lookup::Identifier(Identifier {
                r#type: "email".to_owned(),
                value: format!("{FIRST}-not-an-email"),
            })),
        })
        .await;

    assert!(tessera.terminate().await, "tessera dev stops cleanly");
    let written = std::fs::read_to_string(&log).unwrap();
    // Debug logging was on and the run was logged: the check below means something.
    assert!(
        written.contains("DEBUG") && written.lines().count() > 50,
        "the debug log is too short to say anything: {written}"
    );
    let lower = written.to_lowercase();
    for needle in [EMAIL, PHONE, PHONE_DIGITS, FIRST, LAST] {
        let found: Vec<&str> = written
            .lines()
            .filter(|l| l.to_lowercase().contains(&needle.to_lowercase()))
            .take(5)
            .collect();
        assert!(
            !lower.contains(&needle.to_lowercase()),
            "{needle:?} appears in the log:\n{}",
            found.join("\n")
        );
    }
}

fn base64_basic(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
}

async fn raw_http(addr: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
