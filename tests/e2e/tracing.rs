//! One trace per event: the four services as separate processes export to a local OTLP
//! receiver, and one message's spans from ingestion, identity, profile and scoring form one tree
//! under the span its client sent; a message sent without trace context gets a trace of its own.
//! Spans also reach a collector over TLS (`https://`), trusted through the system's roots or a
//! CA file, with a client certificate when the collector asks for one.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tessera_testkit::{TestDb, redis_prefix};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::wait_for;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::separate_processes::Deployment;

/// One exported span, as the receiver keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// The exporting process's `service.name`.
    service: String,
    pub(crate) name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    pub(crate) attributes: HashMap<String, String>,
}

/// An OTLP/gRPC trace receiver that keeps every span it is sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on a free loopback port until the test ends.
    pub(crate) async fn start(&self) -> SocketAddr {
        self.start_with(None).await
    }

    /// Serves on a free loopback port, over TLS when `tls` is given.
    pub(crate) async fn start_with(&self, tls: Option<ServerTlsConfig>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).expect("receiver tls");
        }
        tokio::spawn(async move {
            builder
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("otlp receiver");
        });
        addr
    }

    fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    pub(crate) fn all(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

/// The per-event span each service opens, by the service that exports it.
const EVENT_SPANS: [(&str, &str); 4] = [
    ("tessera-ingestion", "ingestion.deliver_event"),
    ("tessera-identity", "identity.resolve_event"),
    ("tessera-profile", "profile.apply_event"),
    ("tessera-scoring", "scoring.score_profile"),
];

/// What is wrong with `spans` as one trace's tree rooted at `root_parent` (the client's span
/// id, or empty for a trace Tessera started): a span whose parent is neither in the trace nor
/// the root's parent, or a per-event span missing (from its service, or from `one_process` when
/// one process runs them all). `None` when it is complete.
fn incomplete(spans: &[Received], root_parent: &str, one_process: Option<&str>) -> Option<String> {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for (service, name) in EVENT_SPANS {
        let service = one_process.unwrap_or(service);
        if !spans.iter().any(|s| s.service == service && s.name == name) {
            return Some(format!("no span {name} from {service}"));
        }
    }
    for s in spans {
        if s.parent_span_id != root_parent && !ids.contains(s.parent_span_id.as_str()) {
            return Some(format!(
                "span {} of {} has parent {:?}, which is not in the trace",
                s.name, s.service, s.parent_span_id
            ));
        }
    }
    None
}

/// Polls until the trace `trace_id` is a complete tree under `root_parent`; panics with what
/// is missing after `timeout`.
async fn complete_trace(
    receiver: &Receiver,
    trace_id: &str,
    root_parent: &str,
    timeout: Duration,
) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let spans = receiver.trace(trace_id);
        let problem = incomplete(&spans, root_parent, None);
        let Some(problem) = problem else {
            return spans;
        };
        if tokio::time::Instant::now() >= deadline {
            let names: Vec<_> = spans
                .iter()
                .map(|s| {
                    format!(
                        "{}:{} {}<-{}",
                        s.service, s.name, s.span_id, s.parent_span_id
                    )
                })
                .collect();
            panic!("trace {trace_id} is not one tree: {problem}; spans: {names:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs one track call to `/v1/track` with `headers`; returns the status line.
async fn http_track(
    http_addr: &str,
    write_key: &str,
    body: &serde_json::Value,
    headers: &str,
) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
    let body = body.to_string();
    let request = format!(
        "POST /v1/track HTTP/1.1\r\nHost: {http_addr}\r\nContent-Type: application/json\r\n\
         Authorization: Basic {auth}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n\
         {body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

/// The span a parent in `spans` names, for following a chain.
fn parent_of<'a>(spans: &'a [Received], span: &Received) -> Option<&'a Received> {
    spans.iter().find(|s| s.span_id == span.parent_span_id)
}

fn named<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_message_is_one_trace_through_all_four_services() {
    let receiver = Receiver::default();
    let otlp = receiver.start().await;
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let d = Deployment::start_with(&db, &prefix, |b| {
        b.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
    })
    .await;
    let read = d.profile.channel().await;

    // The client's own span: a trace id and span id of the test's choosing.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let client_span = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let user = format!("traced-{}", uuid::Uuid::new_v4().simple());
    let status = http_track(
        &d.ingestion.http_addr,
        &d.write_key,
        &serde_json::json!({"userId": user, "event": "Traced", "messageId": "traced-1"}),
        &format!("traceparent: 00-{trace_id}-{client_span}-01\r\ntracestate: test=1\r\n"),
    )
    .await;
    assert!(status.contains(" 200 "), "{status}");
    wait_for(&read, "user_id", &user, Duration::from_secs(30), |p| {
        p.event_count == 1
    })
    .await;

    let spans = complete_trace(&receiver, &trace_id, &client_span, Duration::from_secs(30)).await;
    // The request's span is the client span's child, in the ingestion service.
    let request = spans
        .iter()
        .find(|s| s.parent_span_id == client_span)
        .expect("a span under the client's");
    assert_eq!(request.service, "tessera-ingestion");
    assert_eq!(request.name, "POST /v1/track");
    // Identity, profile and scoring hang under the event's delivery, which continues from
    // the span that accepted it.
    let deliver = named(&spans, "ingestion.deliver_event");
    let accept = parent_of(&spans, deliver).expect("the delivery's parent");
    assert_eq!(accept.name, "ingestion.accept_event");
    assert_eq!(
        accept.attributes.get("message_id").map(String::as_str),
        Some("traced-1")
    );
    assert_eq!(
        parent_of(&spans, accept).map(|s| s.span_id.as_str()),
        Some(request.span_id.as_str())
    );
    for name in ["identity.resolve_event", "profile.apply_event"] {
        let span = named(&spans, name);
        assert_eq!(span.parent_span_id, deliver.span_id, "{name}");
    }
    let score = named(&spans, "scoring.score_profile");
    assert_eq!(
        score.parent_span_id,
        named(&spans, "profile.apply_event").span_id
    );
    // Every service reported under its own name.
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for (service, _) in EVENT_SPANS {
        assert!(
            services.contains(service),
            "{service} missing: {services:?}"
        );
    }

    // A message without trace context starts a trace of its own.
    let other = format!("untraced-{}", uuid::Uuid::new_v4().simple());
    let status = http_track(
        &d.ingestion.http_addr,
        &d.write_key,
        &serde_json::json!({"userId": other, "event": "Untraced", "messageId": "untraced-1"}),
        "",
    )
    .await;
    assert!(status.contains(" 200 "), "{status}");
    wait_for(&read, "user_id", &other, Duration::from_secs(30), |p| {
        p.event_count == 1
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let accepted = loop {
        let found = receiver.all().into_iter().find(|s| {
            s.name == "ingestion.accept_event"
                && s.attributes.get("message_id").map(String::as_str) == Some("untraced-1")
        });
        if let Some(span) = found {
            break span;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no accept span for the untraced message"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(accepted.trace_id, trace_id);
    assert!(
        accepted.parent_span_id.is_empty(),
        "the untraced message's span is a root: {accepted:?}"
    );
    let own = complete_trace(&receiver, &accepted.trace_id, "", Duration::from_secs(30)).await;
    assert_eq!(
        own.iter().filter(|s| s.parent_span_id.is_empty()).count(),
        1,
        "one root"
    );
    // Its request's span is in another trace: the message's trace holds only its own spans.
    assert!(own.iter().all(|s| !s.name.starts_with("POST")));
    let _ = (&d.identity, &d.scoring);
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_still_queued_are_exported_at_shutdown() {
    let receiver = Receiver::default();
    let otlp = receiver.start().await;
    let data = tempfile::tempdir().unwrap();
    // A schedule delay far beyond the test: only the shutdown's flush can export the spans.
    let mut dev = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .start()
        .await;
    let read = dev.channel().await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let user = format!("flushed-{}", uuid::Uuid::new_v4().simple());
    let status = http_track(
        &dev.http_addr,
        dev.dev_write_key(),
        &serde_json::json!({"userId": user, "event": "Flushed"}),
        &format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01\r\n"),
    )
    .await;
    assert!(status.contains(" 200 "), "{status}");
    wait_for(&read, "user_id", &user, Duration::from_secs(30), |p| {
        p.event_count == 1
    })
    .await;
    assert!(
        receiver.trace(&trace_id).is_empty(),
        "exported before shutdown"
    );
    assert!(
        dev.terminate().await,
        "tessera dev exits cleanly on SIGTERM"
    );
    let spans = receiver.trace(&trace_id);
    assert!(
        spans.iter().all(|s| s.service == "tessera-dev"),
        "{spans:?}"
    );
    // One process runs the four services: their per-event spans are all there.
    assert_eq!(
        incomplete(&spans, "00f067aa0ba902b7", Some("tessera-dev")),
        None,
        "{spans:?}"
    );
}

/// `tessera dev-certs` into a new directory: a CA, and certificates (`NAME.pem`,
/// `NAME-key.pem`) valid for localhost and 127.0.0.1.
async fn dev_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let made = tokio::process::Command::new(tessera_tests::tessera_bin())
        .args(["dev-certs", "--out", dir.path().to_str().unwrap()])
        .env_clear()
        .output()
        .await
        .expect("run tessera dev-certs");
    assert!(made.status.success(), "tessera dev-certs: {made:?}");
    dir
}

/// Starts `tessera dev` exporting to `endpoint` with `env`, sends one traced track call and
/// waits until the receiver has its accept span.
async fn one_traced_message_arrives(receiver: &Receiver, endpoint: String, env: &[(&str, String)]) {
    let data = tempfile::tempdir().unwrap();
    let mut builder = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    for (key, value) in env {
        builder = builder.env(key, value.clone());
    }
    let dev = builder.start().await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let status = http_track(
        &dev.http_addr,
        dev.dev_write_key(),
        &serde_json::json!({"userId": "tls-traced", "event": "Traced"}),
        &format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01\r\n"),
    )
    .await;
    assert!(status.contains(" 200 "), "{status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !receiver
        .trace(&trace_id)
        .iter()
        .any(|s| s.name == "ingestion.accept_event" && s.service == "tessera-dev")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no span of trace {trace_id} reached the collector over TLS within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_https_collector_that_asks_for_a_client_certificate() {
    let certs = dev_certs().await;
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
    // The collector's certificate is of the dev CA, which only OTEL_EXPORTER_OTLP_CERTIFICATE
    // makes trusted; it admits only clients with a certificate of the same CA.
    let receiver = Receiver::default();
    let otlp = receiver
        .start_with(Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(
                    read("scoring.pem"),
                    read("scoring-key.pem"),
                ))
                .client_ca_root(Certificate::from_pem(read("ca.pem"))),
        ))
        .await;
    one_traced_message_arrives(
        &receiver,
        format!("https://127.0.0.1:{}", otlp.port()),
        &[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", file("ca.pem")),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", file("profile.pem")),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", file("profile-key.pem")),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_https_collector_trusted_through_the_system_roots() {
    let certs = dev_certs().await;
    let read = |name: &str| std::fs::read(certs.path().join(name)).unwrap();
    let receiver = Receiver::default();
    let otlp = receiver
        .start_with(Some(ServerTlsConfig::new().identity(Identity::from_pem(
            read("scoring.pem"),
            read("scoring-key.pem"),
        ))))
        .await;
    // SSL_CERT_FILE stands in for the system's store (as for OpenSSL's tools): the dev CA is
    // trusted as a system root, with no OTEL_EXPORTER_OTLP_CERTIFICATE.
    let ca = certs.path().join("ca.pem").to_str().unwrap().to_owned();
    one_traced_message_arrives(
        &receiver,
        format!("https://127.0.0.1:{}", otlp.port()),
        &[("SSL_CERT_FILE", ca)],
    )
    .await;
}

#[test]
fn an_unreadable_otlp_ca_file_stops_the_start_naming_the_variable() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tessera_tests::tessera_bin())
        .args(["dev", "--data-dir", data.path().to_str().unwrap()])
        .env_clear()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/otlp-ca.pem")
        .output()
        .expect("run tessera");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "OTEL_EXPORTER_OTLP_CERTIFICATE (telemetry.otlp_certificate): \
             /nonexistent/otlp-ca.pem: cannot read"
        ),
        "{stderr}"
    );
}
