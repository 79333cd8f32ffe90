//! One trace per event: the four services as separate processes export to a local OTLP
//! receiver, and one message's spans from ingestion, identity, profile and scoring form one tree
//! under the span its client sent; a message sent without trace context gets a trace of its own.

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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
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
